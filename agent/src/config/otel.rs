//! Validated export settings from the raw flags / `OTEL_*` variables.
//! Each error names the setting (flag and variable) and what is wrong.
use std::{collections::HashMap, path::PathBuf, time::Duration};

use super::{env, Config};
use crate::{export::sampler::Sampler, privacy::HeaderPolicy};

/// A setting that cannot be used, with the reason.
#[derive(Debug, thiserror::Error)]
#[error("invalid setting {setting}: {problem}")]
pub struct SettingError {
    pub setting: String,
    pub problem: String,
}

fn bad(flag: &str, var: &str, problem: impl Into<String>) -> SettingError {
    SettingError {
        setting: format!("--{flag} ({var})"),
        problem: problem.into(),
    }
}

/// OTLP transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Grpc,
    HttpProtobuf,
}

/// Where and how to send one OTLP signal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OtlpTarget {
    pub endpoint: String,
    pub protocol: Protocol,
    pub headers: Vec<(String, String)>,
    pub timeout: Duration,
    pub insecure: bool,
    pub ca_file: Option<PathBuf>,
}

/// Everything the export side needs, validated.
#[derive(Debug, Clone)]
pub struct ExportSettings {
    pub console: bool,
    pub otlp_traces: Option<OtlpTarget>,
    pub otlp_metrics: Option<OtlpTarget>,
    pub sampler: Sampler,
    pub resource_attributes: Vec<(String, String)>,
    pub service_names: HashMap<String, String>,
    pub agent_service_name: String,
    pub headers: HeaderPolicy,
    pub capture_query: bool,
    pub queue: usize,
    pub metric_interval: Duration,
}

impl ExportSettings {
    pub fn from_config(c: &Config) -> Result<Self, SettingError> {
        let protocol = match c.otlp_protocol.trim() {
            "grpc" => Protocol::Grpc,
            "http/protobuf" => Protocol::HttpProtobuf,
            "http/json" => {
                return Err(bad(
                    "otlp-protocol",
                    env::OTLP_PROTOCOL,
                    "http/json is not supported; use grpc or http/protobuf",
                ))
            }
            other => {
                return Err(bad(
                    "otlp-protocol",
                    env::OTLP_PROTOCOL,
                    format!("unknown protocol `{other}`; use grpc or http/protobuf"),
                ))
            }
        };
        let endpoint_configured =
            c.otlp_endpoint.is_some() || c.otlp_traces_endpoint.is_some() || c.otlp_metrics_endpoint.is_some();
        let traces = exporters(
            c.traces_exporter.as_deref(),
            "traces-exporter",
            env::TRACES_EXPORTER,
            endpoint_configured,
            "console",
            &["console", "otlp", "none"],
        )?;
        let metrics = exporters(
            c.metrics_exporter.as_deref(),
            "metrics-exporter",
            env::METRICS_EXPORTER,
            endpoint_configured,
            "none",
            &["otlp", "prometheus", "none"],
        )?;
        let headers = parse_pairs(c.otlp_headers.as_deref().unwrap_or(""), true)
            .map_err(|p| bad("otlp-headers", env::OTLP_HEADERS, p))?;
        let headers = with_user_agent(headers);
        let target =
            |specific: &Option<String>, flag: &str, var: &str, path: &str| -> Result<OtlpTarget, SettingError> {
                let endpoint = match (specific, &c.otlp_endpoint) {
                    (Some(full), _) => full.clone(),
                    (None, Some(base)) if protocol == Protocol::HttpProtobuf => {
                        format!("{}/{path}", base.trim_end_matches('/'))
                    }
                    (None, Some(base)) => base.clone(),
                    (None, None) if protocol == Protocol::HttpProtobuf => format!("http://localhost:4318/{path}"),
                    (None, None) => "http://localhost:4317".to_owned(),
                };
                let (flag, var) = if specific.is_some() {
                    (flag, var)
                } else {
                    ("otlp-endpoint", env::OTLP_ENDPOINT)
                };
                validate_endpoint(&endpoint, protocol).map_err(|p| bad(flag, var, p))?;
                if let Some(ca) = &c.otlp_certificate {
                    if !ca.is_file() {
                        return Err(bad(
                            "otlp-certificate",
                            env::OTLP_CERTIFICATE,
                            format!("{} is not a readable file", ca.display()),
                        ));
                    }
                }
                Ok(OtlpTarget {
                    endpoint,
                    protocol,
                    headers: headers.clone(),
                    timeout: Duration::from_millis(c.otlp_timeout_ms.max(1)),
                    insecure: c.otlp_insecure,
                    ca_file: c.otlp_certificate.clone(),
                })
            };
        let otlp_traces = if traces.contains(&"otlp") {
            Some(target(
                &c.otlp_traces_endpoint,
                "otlp-traces-endpoint",
                env::OTLP_TRACES_ENDPOINT,
                "v1/traces",
            )?)
        } else {
            None
        };
        let otlp_metrics = if metrics.contains(&"otlp") {
            Some(target(
                &c.otlp_metrics_endpoint,
                "otlp-metrics-endpoint",
                env::OTLP_METRICS_ENDPOINT,
                "v1/metrics",
            )?)
        } else {
            None
        };
        let sampler = Sampler::parse(&c.sampler, c.sampler_arg.as_deref()).map_err(|p| {
            let (flag, var) = if p.contains("argument") {
                ("sampler-arg", env::TRACES_SAMPLER_ARG)
            } else {
                ("sampler", env::TRACES_SAMPLER)
            };
            bad(flag, var, p)
        })?;
        let resource_attributes = parse_pairs(c.resource_attributes.as_deref().unwrap_or(""), true)
            .map_err(|p| bad("resource-attributes", env::RESOURCE_ATTRIBUTES, p))?;
        let service_names = parse_pairs(c.service_names.as_deref().unwrap_or(""), false)
            .map_err(|p| bad("service-names", env::SERVICE_NAMES, p))?
            .into_iter()
            .collect();
        Ok(Self {
            console: traces.contains(&"console"),
            otlp_traces,
            otlp_metrics,
            sampler,
            resource_attributes,
            service_names,
            agent_service_name: c.service_name.clone(),
            headers: HeaderPolicy::new(
                &c.capture_request_headers,
                &c.capture_response_headers,
                &c.redact_headers,
            ),
            capture_query: c.capture_query,
            queue: c.export_queue as usize,
            metric_interval: Duration::from_millis(c.metric_export_interval_ms.max(100)),
        })
    }
}

fn exporters<'a>(
    raw: Option<&str>,
    flag: &str,
    var: &str,
    endpoint_configured: bool,
    fallback: &'static str,
    allowed: &[&'a str],
) -> Result<Vec<&'a str>, SettingError> {
    let raw = raw.map(str::trim).filter(|r| !r.is_empty());
    let raw = raw.unwrap_or(if endpoint_configured { "otlp" } else { fallback });
    let mut out = Vec::new();
    for name in raw.split(',').map(str::trim) {
        match allowed.iter().find(|a| **a == name) {
            Some(a) if *a != "none" => out.push(*a),
            Some(_) => {}
            None => {
                return Err(bad(
                    flag,
                    var,
                    format!("unknown exporter `{name}`; use one or more of {}", allowed.join(", ")),
                ))
            }
        }
    }
    Ok(out)
}

fn validate_endpoint(endpoint: &str, protocol: Protocol) -> Result<(), String> {
    let uri: axum::http::Uri = endpoint
        .parse()
        .map_err(|e| format!("`{endpoint}` is not a URL ({e})"))?;
    match uri.scheme_str() {
        Some("http") => {}
        Some("https") if protocol == Protocol::Grpc => {}
        Some("https") => {
            return Err(format!(
                "`{endpoint}`: HTTPS is only supported with --otlp-protocol grpc in this build; use grpc for TLS or a plaintext local collector"
            ))
        }
        _ => return Err(format!("`{endpoint}` must start with http:// or https://")),
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(format!("`{endpoint}` has no host"));
    }
    Ok(())
}

/// Parses `k=v,k2=v2` (W3C-baggage style, values percent-decoded).
fn parse_pairs(raw: &str, decode: bool) -> Result<Vec<(String, String)>, String> {
    raw.split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (k, v) = pair
                .split_once('=')
                .ok_or_else(|| format!("`{pair}` is not key=value"))?;
            let (k, v) = (k.trim(), v.trim());
            if k.is_empty() {
                return Err(format!("`{pair}` has an empty key"));
            }
            let v = if decode {
                percent_decode(v).ok_or_else(|| format!("`{pair}` has a bad %-escape"))?
            } else {
                v.to_owned()
            };
            Ok((k.to_owned(), v))
        })
        .collect()
}

fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// The export headers with the agent's `User-Agent` first: a collector the
/// agent traces then shows which requests are the agent's own exports
/// ([`crate::export::is_own_export`]). A user-agent of the user's own is kept
/// after it.
fn with_user_agent(mut headers: Vec<(String, String)>) -> Vec<(String, String)> {
    let theirs = headers
        .iter()
        .position(|(k, _)| k.eq_ignore_ascii_case("user-agent"))
        .map(|at| headers.remove(at).1);
    let value = match theirs {
        Some(theirs) => format!("{} {theirs}", crate::export::USER_AGENT),
        None => crate::export::USER_AGENT.to_owned(),
    };
    // Spelled as the OpenTelemetry exporters spell their default, which
    // this replaces.
    headers.push(("User-Agent".to_owned(), value));
    headers
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    fn settings(args: &[&str]) -> Result<ExportSettings, SettingError> {
        let mut all = vec!["meshless"];
        all.extend_from_slice(args);
        ExportSettings::from_config(&Config::try_parse_from(all).expect("flags parse"))
    }

    #[test]
    fn console_is_the_default_and_otlp_follows_an_endpoint() {
        let s = settings(&[]).expect("valid");
        assert!(s.console && s.otlp_traces.is_none() && s.otlp_metrics.is_none());
        let s = settings(&["--otlp-endpoint", "http://c:4318", "--otlp-protocol", "http/protobuf"]).expect("valid");
        assert!(!s.console);
        assert_eq!(s.otlp_traces.expect("traces").endpoint, "http://c:4318/v1/traces");
        assert_eq!(s.otlp_metrics.expect("metrics").endpoint, "http://c:4318/v1/metrics");
        let s = settings(&["--traces-exporter", "console,otlp"]).expect("valid");
        assert!(s.console);
        assert_eq!(s.otlp_traces.expect("traces").endpoint, "http://localhost:4317");
    }

    #[test]
    fn export_requests_carry_the_agents_user_agent_before_the_users_own() {
        let ua = |s: ExportSettings| {
            let t = s.otlp_traces.expect("traces");
            let all: Vec<_> = t
                .headers
                .iter()
                .filter(|(k, _)| k.eq_ignore_ascii_case("user-agent"))
                .collect();
            assert_eq!(all.len(), 1, "{:?}", t.headers);
            all[0].1.clone()
        };
        let s = settings(&["--otlp-endpoint", "http://c:4317", "--otlp-headers", "x-team=a"]).expect("valid");
        assert_eq!(ua(s), crate::export::USER_AGENT);
        let s = settings(&[
            "--otlp-endpoint",
            "http://c:4317",
            "--otlp-headers",
            "USER-AGENT=gateway/2",
        ])
        .expect("valid");
        assert_eq!(ua(s), format!("{} gateway/2", crate::export::USER_AGENT));
    }

    #[test]
    fn bad_settings_name_the_setting() {
        let cases: [(&[&str], &str); 6] = [
            (&["--otlp-endpoint", "collector:4317"], "OTEL_EXPORTER_OTLP_ENDPOINT"),
            (
                &["--otlp-endpoint", "http://c:4317", "--otlp-protocol", "udp"],
                "OTEL_EXPORTER_OTLP_PROTOCOL",
            ),
            (
                &["--sampler", "traceidratio", "--sampler-arg", "1.5"],
                "OTEL_TRACES_SAMPLER_ARG",
            ),
            (&["--sampler", "sometimes"], "OTEL_TRACES_SAMPLER"),
            (&["--traces-exporter", "zipkin"], "OTEL_TRACES_EXPORTER"),
            (&["--otlp-headers", "novalue"], "OTEL_EXPORTER_OTLP_HEADERS"),
        ];
        for (args, var) in cases {
            let err = settings(args).expect_err("must be rejected").to_string();
            assert!(err.contains(var), "{args:?}: {err}");
        }
    }

    #[test]
    fn headers_are_percent_decoded() {
        let s = settings(&[
            "--otlp-endpoint",
            "http://c:4317",
            "--otlp-headers",
            "api-key=a%20b,x=1",
        ])
        .expect("valid");
        assert_eq!(
            s.otlp_traces.expect("t").headers,
            vec![
                ("api-key".into(), "a b".into()),
                ("x".into(), "1".into()),
                ("User-Agent".into(), crate::export::USER_AGENT.into())
            ]
        );
    }
}
