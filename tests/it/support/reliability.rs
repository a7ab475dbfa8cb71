//! The machine-readable lines the hostile-input and upstream-fault tables
//! print, `RELIABILITY|table|cell|cell|...`, which `bench/reliability.sh`
//! collects (from a `--nocapture` run) into RELIABILITY.md.

/// Prints one `RELIABILITY|table|...` line; `|` and line breaks in cells are escaped.
pub(crate) fn report(table: &str, cells: &[&str]) {
    let cells: Vec<String> = cells
        .iter()
        .map(|cell| {
            cell.replace('|', "\\|")
                .replace('\r', "\\r")
                .replace('\n', "\\n")
        })
        .collect();
    println!("RELIABILITY|{table}|{}", cells.join("|"));
}

/// Bytes as printable text: ASCII kept, CR/LF/NUL/others escaped, long runs shortened.
pub(crate) fn escape(bytes: &[u8]) -> String {
    let mut text = String::new();
    let mut index = 0;
    while index < bytes.len() {
        // A run of one repeated byte (padding, flooding) is written once with a count.
        let run = bytes[index..]
            .iter()
            .take_while(|&&b| b == bytes[index])
            .count();
        if run > 16 {
            text.push_str(&format!("{}×{run}", escape(&bytes[index..=index])));
            index += run;
            continue;
        }
        match bytes[index] {
            b'\r' => text.push_str("\\r"),
            b'\n' => text.push_str("\\n"),
            b'\t' => text.push_str("\\t"),
            b'\\' => text.push_str("\\\\"),
            byte @ 0x20..=0x7e => text.push(byte as char),
            byte => text.push_str(&format!("\\x{byte:02x}")),
        }
        index += 1;
    }
    if text.chars().count() > 160 {
        let cut: String = text.chars().take(157).collect();
        return format!("{cut}...");
    }
    text
}
