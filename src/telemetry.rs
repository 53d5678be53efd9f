//! What billsync tells its operator: Prometheus metrics (`GET /metrics`) and logs that carry a
//! request id, never show a secret, and mask emails and phone numbers wherever they appear.

use std::{
    io::{self, Write},
    sync::{Arc, OnceLock},
    time::Instant,
};

use axum::{
    extract::{MatchedPath, Request},
    middleware::Next,
    response::Response,
};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

/// Latency buckets in seconds, from a cache hit to a Stripe call near its timeout.
const LATENCY_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// The process-wide metrics recorder, installed by the first call (metrics, like the process,
/// are global: every router and worker of the process reports into it).
pub fn prometheus() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let recorder = PrometheusBuilder::new()
            .set_buckets(&LATENCY_BUCKETS)
            .expect("latency buckets are not empty")
            .build_recorder();
        let handle = recorder.handle();
        // Another recorder installed by an embedding application keeps precedence; /metrics
        // then renders what reaches ours (nothing), rather than failing.
        if metrics::set_global_recorder(recorder).is_err() {
            tracing::warn!("a metrics recorder was already installed: /metrics will be empty");
        }
        handle
    })
}

/// Counts and times every HTTP request by route template (never the raw path, so ids do not
/// become labels) and status.
pub async fn track_http(request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let method = request.method().as_str().to_owned();
    let started = Instant::now();
    let response = next.run(request).await;
    let status = response.status().as_u16().to_string();
    metrics::counter!("billsync_http_requests_total",
        "method" => method.clone(), "route" => route.clone(), "status" => status)
    .increment(1);
    metrics::histogram!("billsync_http_request_duration_seconds",
        "method" => method, "route" => route)
    .record(started.elapsed().as_secs_f64());
    response
}

/// One Stripe attempt: its operation (`customers.update`), outcome and latency.
pub fn stripe_attempt(operation: &'static str, outcome: &'static str, elapsed: f64) {
    metrics::counter!("billsync_stripe_requests_total",
        "operation" => operation, "outcome" => outcome)
    .increment(1);
    metrics::histogram!("billsync_stripe_request_duration_seconds", "operation" => operation)
        .record(elapsed);
}

/// The log output format, `BILLSYNC_LOG_FORMAT`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// Human-readable lines (the default on a terminal and off it).
    #[default]
    Pretty,
    /// One JSON object per line, with the request's span fields (request id) on each.
    Json,
}

impl std::str::FromStr for LogFormat {
    type Err = String;
    fn from_str(raw: &str) -> Result<Self, String> {
        match raw {
            "pretty" => Ok(Self::Pretty),
            "json" => Ok(Self::Json),
            other => Err(format!(
                "BILLSYNC_LOG_FORMAT must be json or pretty, got {other:?}"
            )),
        }
    }
}

/// Installs the process's log subscriber: `RUST_LOG` filter (default `info`), to stderr,
/// through the scrubber.
pub fn init_logs(format: LogFormat, secrets: Vec<String>) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let writer = Scrubbing::new(io::stderr, secrets);
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer);
    let _ = match format {
        LogFormat::Pretty => builder
            .with_ansi(io::IsTerminal::is_terminal(&io::stderr()))
            .try_init(),
        LogFormat::Json => builder
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .try_init(),
    };
}

/// A log writer that masks emails and phone numbers and redacts the configured secrets in each
/// line before it reaches the sink: a safety net under every log statement, including error
/// messages that quote user input or Stripe's answers.
#[derive(Clone)]
pub struct Scrubbing<M> {
    sink: M,
    secrets: Arc<Vec<String>>,
}

impl<M> Scrubbing<M> {
    pub fn new(sink: M, secrets: Vec<String>) -> Self {
        let mut secrets: Vec<String> = secrets.into_iter().filter(|s| s.len() >= 8).collect();
        // Longest first, so a secret that contains another is redacted whole.
        secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
        Self {
            sink,
            secrets: Arc::new(secrets),
        }
    }
}

impl<'a, M> tracing_subscriber::fmt::MakeWriter<'a> for Scrubbing<M>
where
    M: tracing_subscriber::fmt::MakeWriter<'a>,
{
    type Writer = ScrubbedLine<M::Writer>;
    fn make_writer(&'a self) -> Self::Writer {
        ScrubbedLine {
            sink: self.sink.make_writer(),
            secrets: self.secrets.clone(),
            line: Vec::new(),
        }
    }
}

/// One event's output, scrubbed and written when the event is done.
pub struct ScrubbedLine<W: Write> {
    sink: W,
    secrets: Arc<Vec<String>>,
    line: Vec<u8>,
}

impl<W: Write> Write for ScrubbedLine<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.line.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<W: Write> Drop for ScrubbedLine<W> {
    fn drop(&mut self) {
        if self.line.is_empty() {
            return;
        }
        let text = String::from_utf8_lossy(&self.line);
        let scrubbed = scrub(&text, &self.secrets);
        let _ = self.sink.write_all(scrubbed.as_bytes());
        let _ = self.sink.flush();
    }
}

/// Redacts `secrets`, then masks what looks like an email (`a***@example.com`) or an E.164
/// phone number (`+*******0100`).
pub fn scrub(text: &str, secrets: &[String]) -> String {
    let mut text = text.to_owned();
    for secret in secrets {
        if text.contains(secret.as_str()) {
            text = text.replace(secret.as_str(), "[REDACTED]");
        }
    }
    mask_phones(&mask_emails(&text))
}

fn is_local_char(c: char) -> bool {
    c.is_alphanumeric() || "._%+-'".contains(c)
}

fn is_domain_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '.' || c == '-'
}

fn mask_emails(text: &str) -> String {
    if !text.contains('@') {
        return text.to_owned();
    }
    let chars: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    let mut start_of_unflushed = 0;
    let mut i = 0;
    while i < chars.len() {
        if chars[i] != '@' {
            i += 1;
            continue;
        }
        let mut local_start = i;
        while local_start > start_of_unflushed && is_local_char(chars[local_start - 1]) {
            local_start -= 1;
        }
        let mut domain_end = i + 1;
        while domain_end < chars.len() && is_domain_char(chars[domain_end]) {
            domain_end += 1;
        }
        let domain: String = chars[i + 1..domain_end].iter().collect();
        let domain = domain.trim_end_matches(['.', '-']);
        if local_start < i && domain.contains('.') && !domain.starts_with('.') {
            out.extend(&chars[start_of_unflushed..local_start]);
            out.push(chars[local_start]);
            out.push_str("***@");
            out.push_str(domain);
            let consumed = i + 1 + domain.chars().count();
            start_of_unflushed = consumed;
            i = consumed;
        } else {
            i += 1;
        }
    }
    out.extend(&chars[start_of_unflushed..]);
    out
}

fn mask_phones(text: &str) -> String {
    if !text.contains('+') {
        return text.to_owned();
    }
    let bytes = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut flushed = 0;
    let mut i = 0;
    while i < bytes.len() {
        let starts_number = bytes[i] == b'+' && (i == 0 || !bytes[i - 1].is_ascii_alphanumeric());
        if starts_number {
            let digits = bytes[i + 1..]
                .iter()
                .take_while(|b| b.is_ascii_digit())
                .count();
            let end = i + 1 + digits;
            let followed_by_word = bytes.get(end).is_some_and(u8::is_ascii_alphanumeric);
            if (7..=15).contains(&digits) && !followed_by_word {
                out.push_str(&text[flushed..i]);
                out.push('+');
                out.push_str(&"*".repeat(digits - 4));
                out.push_str(&text[end - 4..end]);
                flushed = end;
                i = end;
                continue;
            }
        }
        i += 1;
    }
    out.push_str(&text[flushed..]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emails_are_masked_wherever_they_appear() {
        assert_eq!(
            scrub(
                r#"user alice.smith+x@example.co.uk changed, was "bob@corp.io"."#,
                &[]
            ),
            r#"user a***@example.co.uk changed, was "b***@corp.io"."#
        );
        assert_eq!(
            scrub("no emails @ here, nor a@b", &[]),
            "no emails @ here, nor a@b"
        );
        assert_eq!(
            scrub("email=ünï@example.com", &[]),
            "email=ü***@example.com"
        );
    }

    #[test]
    fn phone_numbers_keep_only_their_last_four_digits() {
        assert_eq!(
            scrub("phone: +14155550100, id cus_+123", &[]),
            "phone: +*******0100, id cus_+123"
        );
        assert_eq!(
            scrub("+12 and +1234567890123456789 are not phones", &[]),
            "+12 and +1234567890123456789 are not phones"
        );
    }

    #[test]
    fn configured_secrets_are_redacted() {
        let secrets = vec![
            "sk_test_abcdefgh".to_owned(),
            "whsec_0123456789".to_owned(),
            "short".to_owned(),
        ];
        assert_eq!(
            scrub(
                "key sk_test_abcdefgh and whsec_0123456789, short",
                &Scrubbing::new((), secrets).secrets
            ),
            "key [REDACTED] and [REDACTED], short"
        );
    }

    #[test]
    fn log_formats_parse() {
        assert_eq!("json".parse::<LogFormat>(), Ok(LogFormat::Json));
        assert_eq!("pretty".parse::<LogFormat>(), Ok(LogFormat::Pretty));
        assert!("xml".parse::<LogFormat>().is_err());
    }
}
