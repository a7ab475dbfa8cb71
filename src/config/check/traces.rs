//! `otlp_endpoint`, `otlp_protocol` and the OpenTelemetry variables: trace
//! export is on when an endpoint is set, by the setting or by
//! `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` / `OTEL_EXPORTER_OTLP_ENDPOINT`,
//! unless `OTEL_SDK_DISABLED=true` or `OTEL_TRACES_EXPORTER=none`.
//!
//! A variable keyrelay would misread stops startup naming it, as a
//! setting does: a sampler that is not one, an exporter it does not have.

use std::collections::HashMap;
use std::time::Duration;

use http::{HeaderName, HeaderValue, Uri};

use super::{Problems, Reported};
use crate::config::traces::{OtlpProtocol, Sampler, TraceSettings};
use crate::config::RawConfig;
use crate::usage::inspect::percent_decode;

/// The trace settings, `None` when export is off.
pub(super) fn check(
    raw: &RawConfig,
    env: &HashMap<String, String>,
    found: &mut Problems,
) -> Result<Option<TraceSettings>, Reported> {
    let var = |name: &str| {
        env.get(name)
            .map(|value| value.trim())
            .filter(|value| !value.is_empty())
    };
    if var("OTEL_SDK_DISABLED").is_some_and(|value| value.eq_ignore_ascii_case("true")) {
        return Ok(None);
    }
    match var("OTEL_TRACES_EXPORTER") {
        None | Some("otlp") => {}
        Some("none") => return Ok(None),
        Some(other) => {
            return Err(found.refuse(
                "OTEL_TRACES_EXPORTER",
                format!(
                    "{other:?} is not an exporter keyrelay has: otlp (with otlp_endpoint) or none"
                ),
            ))
        }
    }
    // Where, and which variable said it, for messages.
    let (endpoint, source, whole_url) = match (
        raw.otlp_endpoint.as_deref().unwrap_or("").trim(),
        var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"),
        var("OTEL_EXPORTER_OTLP_ENDPOINT"),
    ) {
        ("", None, None) => {
            // A protocol for no collector would silently do nothing.
            if !raw.otlp_protocol.as_deref().unwrap_or("").trim().is_empty() {
                return Err(found.refuse(
                    "otlp_protocol",
                    "is set, but no collector is: set otlp_endpoint (or OTEL_EXPORTER_OTLP_ENDPOINT)",
                ));
            }
            return Ok(None);
        }
        ("", Some(traces), _) => (traces, "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", true),
        ("", None, Some(base)) => (base, "OTEL_EXPORTER_OTLP_ENDPOINT", false),
        (setting, _, _) => (setting, "otlp_endpoint", false),
    };
    let protocol = protocol(raw, &var, found);
    let endpoint = endpoint_uri(endpoint, source, found);
    let sampler = Sampler::parse(
        var("OTEL_TRACES_SAMPLER").unwrap_or("parentbased_always_on"),
        var("OTEL_TRACES_SAMPLER_ARG"),
    )
    .map_err(|message| found.refuse("OTEL_TRACES_SAMPLER", message));
    let headers_var = if var("OTEL_EXPORTER_OTLP_TRACES_HEADERS").is_some() {
        "OTEL_EXPORTER_OTLP_TRACES_HEADERS"
    } else {
        "OTEL_EXPORTER_OTLP_HEADERS"
    };
    let headers = headers(var(headers_var).unwrap_or(""), headers_var, found);
    let resource = resource(&var, found);
    let millis = |name: &str, default: u64, found: &mut Problems| -> Result<u64, Reported> {
        match var(name) {
            None => Ok(default),
            Some(text) => text
                .parse::<u64>()
                .ok()
                .filter(|&ms| ms > 0)
                .ok_or_else(|| {
                    found.refuse(
                        name,
                        format!("{text:?} is not a positive number of milliseconds"),
                    )
                }),
        }
    };
    let timeout_var = if var("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT").is_some() {
        "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT"
    } else {
        "OTEL_EXPORTER_OTLP_TIMEOUT"
    };
    let timeout = millis(timeout_var, 10_000, found);
    let schedule_delay = millis("OTEL_BSP_SCHEDULE_DELAY", 5_000, found);
    let max_queue = millis("OTEL_BSP_MAX_QUEUE_SIZE", 2_048, found);
    let max_batch = millis("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", 512, found);

    let (protocol, mut endpoint) = (protocol?, endpoint?);
    if protocol == OtlpProtocol::HttpProtobuf && !whole_url {
        // A base address, as OTEL_EXPORTER_OTLP_ENDPOINT is: the signal's path is added.
        let base = endpoint.to_string();
        endpoint = format!("{}/v1/traces", base.trim_end_matches('/'))
            .parse()
            .map_err(|_| found.refuse(source, "is not a URL"))?;
    }
    let (max_queue, max_batch) = (max_queue? as usize, max_batch? as usize);
    Ok(Some(TraceSettings {
        endpoint,
        protocol,
        headers: headers?,
        sampler: sampler?,
        resource: resource?,
        timeout: Duration::from_millis(timeout?),
        schedule_delay: Duration::from_millis(schedule_delay?),
        max_queue,
        // The specification caps a batch at the queue's size.
        max_batch: max_batch.min(max_queue),
    }))
}

fn protocol<'a>(
    raw: &'a RawConfig,
    var: &impl Fn(&str) -> Option<&'a str>,
    found: &mut Problems,
) -> Result<OtlpProtocol, Reported> {
    let (text, source) = match (
        raw.otlp_protocol.as_deref().unwrap_or("").trim(),
        var("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"),
        var("OTEL_EXPORTER_OTLP_PROTOCOL"),
    ) {
        ("", Some(traces), _) => (traces, "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"),
        ("", None, Some(any)) => (any, "OTEL_EXPORTER_OTLP_PROTOCOL"),
        ("", None, None) => return Ok(OtlpProtocol::HttpProtobuf),
        (setting, _, _) => (setting, "otlp_protocol"),
    };
    match text {
        "http/protobuf" => Ok(OtlpProtocol::HttpProtobuf),
        "grpc" => Ok(OtlpProtocol::Grpc),
        other => Err(found.refuse(
            source,
            format!("{other:?} is not a protocol keyrelay exports with: http/protobuf or grpc"),
        )),
    }
}

/// An `http://` or `https://` URL with a host, and no credentials in it
/// (they belong in OTEL_EXPORTER_OTLP_HEADERS, which is never printed).
fn endpoint_uri(text: &str, source: &str, found: &mut Problems) -> Result<Uri, Reported> {
    let Ok(uri) = text.parse::<Uri>() else {
        return Err(found.refuse(
            source,
            "is not a URL (http://HOST:PORT or https://HOST:PORT)",
        ));
    };
    let Some(authority) = uri.authority() else {
        return Err(found.refuse(
            source,
            "names no host (http://HOST:PORT or https://HOST:PORT)",
        ));
    };
    if authority.as_str().contains('@') {
        // Not echoed: the part before the @ is a password.
        return Err(found.refuse(
            source,
            "holds credentials; put them in OTEL_EXPORTER_OTLP_HEADERS",
        ));
    }
    if !matches!(uri.scheme_str(), Some("http" | "https")) {
        return Err(found.refuse(source, "must start with http:// or https://"));
    }
    if uri.query().is_some() {
        return Err(found.refuse(source, "must not have a query"));
    }
    Ok(uri)
}

/// `OTEL_EXPORTER_OTLP_HEADERS`: `name=value,...`, values percent-encoded.
/// The values are secret: messages name the header, never its value.
fn headers(
    text: &str,
    variable: &str,
    found: &mut Problems,
) -> Result<Vec<(HeaderName, HeaderValue)>, Reported> {
    let mut headers = Vec::new();
    for pair in text.split(',').filter(|pair| !pair.trim().is_empty()) {
        let Some((name, value)) = pair.split_once('=') else {
            return Err(found.refuse(variable, "is not a list of name=value pairs"));
        };
        let name = HeaderName::try_from(percent_decode(name.trim()))
            .map_err(|_| found.refuse(variable, "holds a header name that is not one"))?;
        let mut value = HeaderValue::try_from(percent_decode(value.trim())).map_err(|_| {
            found.refuse(
                variable,
                format!("the value of {name} is not a header value"),
            )
        })?;
        value.set_sensitive(true);
        headers.push((name, value));
    }
    Ok(headers)
}

/// `service.name` (from `OTEL_SERVICE_NAME`, else the resource attributes,
/// else "keyrelay"), then `OTEL_RESOURCE_ATTRIBUTES`' `key=value,...`.
fn resource<'a>(
    var: &impl Fn(&str) -> Option<&'a str>,
    found: &mut Problems,
) -> Result<Vec<(String, String)>, Reported> {
    let mut attributes = Vec::new();
    for pair in var("OTEL_RESOURCE_ATTRIBUTES")
        .unwrap_or("")
        .split(',')
        .filter(|pair| !pair.trim().is_empty())
    {
        let Some((key, value)) = pair.split_once('=') else {
            return Err(found.refuse(
                "OTEL_RESOURCE_ATTRIBUTES",
                format!("{pair:?} is not key=value"),
            ));
        };
        attributes.push((percent_decode(key.trim()), percent_decode(value.trim())));
    }
    let named = attributes.iter().position(|(key, _)| key == "service.name");
    let service = match (var("OTEL_SERVICE_NAME"), named) {
        (Some(name), _) => name.to_owned(),
        (None, Some(index)) => attributes[index].1.clone(),
        (None, None) => "keyrelay".to_owned(),
    };
    attributes.retain(|(key, _)| key != "service.name");
    attributes.insert(0, ("service.name".to_owned(), service));
    Ok(attributes)
}
