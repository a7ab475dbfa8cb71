//! Request inspection's unit tests.

use super::*;

#[test]
fn lenient_values_read_as_a_lenient_server_reads_them() {
    for on in [
        serde_json::json!(true),
        serde_json::json!("true"),
        serde_json::json!("True"),
        serde_json::json!(1),
        serde_json::json!("yes"),
    ] {
        assert!(truthy(Some(&on)), "{on}");
    }
    for off in [
        serde_json::json!(false),
        serde_json::json!("false"),
        serde_json::json!(0),
        serde_json::json!(null),
    ] {
        assert!(!truthy(Some(&off)), "{off}");
    }
    let request =
        parse(b"\xEF\xBB\xBF{\"max_tokens\":\"100\",\"max_completion_tokens\":250.0,\"n\":3}")
            .expect("an object after a BOM");
    assert_eq!(max_output(&request), Ok(Some(250)));
    assert_eq!(choices(&request), 3);
    assert_eq!(
        max_output(&parse(b"{\"max_tokens\":null}").expect("object")),
        Ok(None)
    );
    assert!(max_output(&parse(b"{\"max_tokens\":\"lots\"}").expect("object")).is_err());
    assert!(parse(b"[1]").is_none());
}

#[test]
fn caps_refuse_or_clamp_and_fill_in_a_missing_limit() {
    let caps = RequestCaps {
        max_output_tokens: Some(100),
        over_max_output_tokens: OverCap::Refuse,
        allowed_models: vec!["small".to_owned()],
    };
    let mut ok = parse(br#"{"model":"small","max_tokens":50}"#).expect("object");
    assert_eq!(
        caps.apply(
            None,
            &mut ok,
            &http::Uri::from_static("/v1/chat/completions")
        ),
        Ok(false)
    );
    let mut big = parse(br#"{"model":"small","max_completion_tokens":"500"}"#).expect("o");
    assert_eq!(
        caps.apply(
            None,
            &mut big,
            &http::Uri::from_static("/v1/chat/completions")
        ),
        Err(Broken::Output {
            asked: 500,
            cap: 100
        })
    );
    for model in [
        &br#"{"model":"large"}"#[..],
        br#"{"model":["small"]}"#,
        b"{}",
    ] {
        let mut request = parse(model).expect("object");
        assert_eq!(
            caps.apply(None, &mut request, &http::Uri::from_static("/v1/x")),
            Err(Broken::Model)
        );
    }
    let clamp = RequestCaps {
        over_max_output_tokens: OverCap::Clamp,
        ..caps
    };
    clamp
        .apply(
            None,
            &mut big,
            &http::Uri::from_static("/v1/chat/completions"),
        )
        .expect("clamped");
    assert_eq!(big["max_completion_tokens"], 100);
    let mut none = parse(br#"{"model":"small"}"#).expect("object");
    assert_eq!(
        clamp.apply(None, &mut none, &http::Uri::from_static("/v1/responses/")),
        Ok(true)
    );
    assert_eq!(none["max_output_tokens"], 100);
    // An access token's caps add to the route's.
    let token = RequestCaps {
        max_output_tokens: Some(10),
        over_max_output_tokens: OverCap::Refuse,
        allowed_models: vec!["tiny".to_owned()],
    };
    let mut small = parse(br#"{"model":"small","max_tokens":50}"#).expect("object");
    assert_eq!(
        clamp.apply(Some(&token), &mut small, &http::Uri::from_static("/v1/x")),
        Err(Broken::Model)
    );
    let both = RequestCaps {
        allowed_models: vec!["small".to_owned()],
        ..token
    };
    assert_eq!(
        clamp.apply(Some(&both), &mut small, &http::Uri::from_static("/v1/x")),
        Ok(true)
    );
    assert_eq!(
        small["max_tokens"], 10,
        "the lower cap, clamped as the route says"
    );
}

#[test]
fn completions_paths_are_recognised_however_written() {
    for path in [
        "/v1/chat/completions",
        "/v1/chat/completions/",
        "/v1/chat/completions//",
        "/v1/completions",
        "/v1/chat/completion%73",
        "/v1/chat/%63ompletions",
        "/v1/chat%2Fcompletions",
        "/V1/CHAT/COMPLETIONS",
    ] {
        assert!(is_completions_path(path), "{path}");
    }
    for path in ["/v1/embeddings", "/v1/chat/completionsx", "/completions/x"] {
        assert!(!is_completions_path(path), "{path}");
    }
}

#[test]
fn keys_servers_read_differently_make_a_body_unreadable() {
    for ambiguous in [
        &br#"{"model":"a","model":"b"}"#[..],
        br#"{"model":"a","Model":"b"}"#,
        br#"{"Stream":true}"#,
        "{\"max_to\u{212A}ens\":1}".as_bytes(),
        br#"{"x":1,"X":2}"#,
    ] {
        assert!(parse(ambiguous).is_none(), "{ambiguous:?}");
    }
    let fine = parse(br#"{"model":"a","Temperature":1,"messages":[{"a":1,"a":2}]}"#);
    assert!(
        fine.is_some(),
        "nested keys and other fields are the server's"
    );
}

#[test]
fn models_in_paths_are_found() {
    for (path, model) in [
        (
            "/v1beta/models/gemini-pro:generateContent",
            Some("gemini-pro"),
        ),
        (
            "/v1/projects/p/locations/l/publishers/google/models/g%31:x",
            Some("g1"),
        ),
        ("/openai/deployments/gpt/chat/completions", Some("gpt")),
        (
            "/model/anthropic.claude/invoke-with-response-stream",
            Some("anthropic.claude"),
        ),
        ("/model/abc/environments/production/predict", None),
        ("/v1/models", None),
        ("/v1/models/gpt-4", None),
        ("/v1/chat/completions", None),
    ] {
        assert_eq!(path_model(path).as_deref(), model, "{path}");
    }
}
