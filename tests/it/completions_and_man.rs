//! `keyrelay completions SHELL` and `keyrelay man`: what release archives and
//! packagers install beside the binary. Both are rendered from the clap
//! command, so every setting's flag must appear in them; they need no
//! configuration, so a broken environment must not stop them.

use crate::support;

use std::process::Output;

use keyrelay::config::SETTINGS;
use support::*;

/// EX_USAGE: a command-line mistake.
const EX_USAGE: i32 = 64;

fn run(args: &[&str]) -> Output {
    let mut command = binary();
    // An unknown KEYRELAY_* variable is a configuration error for the proxy;
    // generating text must not read the configuration at all.
    command.args(args).env("KEYRELAY_NOT_A_SETTING", "1");
    command.output().expect("run keyrelay")
}

fn stdout_of(output: &Output) -> String {
    assert!(
        output.status.success(),
        "exit {:?}, stderr: {}",
        output.status.code(),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout.clone()).expect("UTF-8 output")
}

/// Each setting's flag name without the dashes (fish writes `-l upstream`).
fn flag_names() -> Vec<String> {
    SETTINGS
        .iter()
        .map(|setting| setting.flag().trim_start_matches('-').to_owned())
        .collect()
}

#[test]
fn completions_name_every_flag_and_subcommand_in_every_shell() {
    for shell in ["bash", "zsh", "fish", "elvish", "powershell"] {
        let script = stdout_of(&run(&["completions", shell]));
        for name in flag_names().iter().map(String::as_str).chain([
            "config",
            "health",
            "demo",
            "completions",
            "man",
        ]) {
            assert!(script.contains(name), "{shell} completions lack {name:?}");
        }
    }
}

#[test]
fn bash_completion_script_loads_and_completes_flags_and_subcommands() {
    let script = stdout_of(&run(&["completions", "bash"]));
    // What bash does on TAB: COMP_WORDS/COMP_CWORD set, the function called
    // with the command, the current word and the previous word.
    let probe = r#"
complete -p keyrelay
complete_at() { COMP_WORDS=("$@"); COMP_CWORD=$(($# - 1)); COMPREPLY=()
  _keyrelay keyrelay "${COMP_WORDS[COMP_CWORD]}" "${COMP_WORDS[COMP_CWORD - 1]}"
  echo "$* => ${COMPREPLY[*]}"; }
complete_at keyrelay --upstr
complete_at keyrelay comp
complete_at keyrelay completions ''
"#;
    let output = std::process::Command::new("bash")
        .args(["--norc", "--noprofile", "-c", &format!("{script}\n{probe}")])
        .output()
        .expect("run bash");
    let text = stdout_of(&output);
    assert!(
        output.stderr.is_empty(),
        "bash complained: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    for expected in [
        "-F _keyrelay keyrelay",
        "keyrelay --upstr => --upstream --upstream-http --upstream-http2",
        "keyrelay comp => completions",
    ] {
        assert!(text.contains(expected), "no {expected:?} in:\n{text}");
    }
    let shells = text
        .lines()
        .find(|line| line.starts_with("keyrelay completions  =>"))
        .unwrap_or_else(|| panic!("no completion of SHELL in:\n{text}"));
    for shell in ["bash", "zsh", "fish"] {
        assert!(
            shells.contains(shell),
            "SHELL completion lacks {shell}: {shells}"
        );
    }
}

#[test]
fn unknown_shell_is_a_usage_error_listing_the_shells() {
    let output = run(&["completions", "tcsh"]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(EX_USAGE), "stderr: {stderr}");
    assert!(
        stderr.contains("bash") && stderr.contains("zsh") && stderr.contains("fish"),
        "{stderr}"
    );
    assert!(output.stdout.is_empty());
}

#[test]
fn man_page_is_roff_naming_keyrelay_its_flags_and_commands() {
    let page = stdout_of(&run(&["man"]));
    let version = env!("CARGO_PKG_VERSION");
    let title = format!(".TH keyrelay 1  \"keyrelay {version}\"");
    let version_line = format!("v{version}");
    for expected in [
        title.as_str(),
        ".SH NAME\nkeyrelay \\- Local authenticating streaming proxy",
        ".SH OPTIONS",
        ".SH COMMANDS",
        "\\fBkeyrelay health\\fR [\\fB\\-\\-url\\fR \\fIURL\\fR]",
        "\\fBkeyrelay completions\\fR \\fISHELL\\fR",
        ".SH EXAMPLES",
        ".SH \"EXIT STATUS\"",
        version_line.as_str(),
    ] {
        assert!(page.contains(expected), "man page lacks {expected:?}");
    }
    for name in flag_names() {
        // roff escapes every hyphen.
        let flag = format!("\\fB\\-\\-{}\\fR", name.replace('-', "\\-"));
        assert!(page.contains(&flag), "man page lacks {flag}");
    }
}

#[test]
fn man_page_renders_without_warnings() {
    // groff comes with man-db on Debian; without it there is nothing to render with.
    let Ok(output) = std::process::Command::new("groff")
        .args(["-man", "-Tascii", "-ww", "-P-cbou", "-rLL=100n"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut groff| {
            use std::io::Write;
            let page = run(&["man"]).stdout;
            groff.stdin.take().expect("stdin").write_all(&page)?;
            groff.wait_with_output()
        })
    else {
        eprintln!("groff not found: the man page was not rendered");
        return;
    };
    let rendered = stdout_of(&output);
    assert!(
        output.stderr.is_empty(),
        "groff warned: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    for expected in [
        "keyrelay health [--url URL]",
        "--upstream <UPSTREAM>",
        "143",
    ] {
        assert!(
            rendered.contains(expected),
            "rendered page lacks {expected:?}:\n{rendered}"
        );
    }
}
