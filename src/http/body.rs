//! Request bodies: form or JSON in, named and checked fields out.
//!
//! Both encodings become one [`Fields`] map, so every endpoint validates its
//! fields once, with one set of rules and one wording of errors, whatever
//! the client sent. The body is bounded in size and in time before it is
//! read whole.

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::header::{
    HeaderMap, HeaderName, CONTENT_ENCODING, CONTENT_LENGTH, CONTENT_TYPE, EXPECT,
    TRANSFER_ENCODING,
};
use hyper::http::request::Parts;
use hyper::Request;

use super::error::ApiError;

/// The largest body accepted; larger ones get 413 before being read whole.
pub const MAX_BODY_BYTES: usize = 16 * 1024;

/// How long a client may take to send its body.
const BODY_TIMEOUT: Duration = Duration::from_secs(10);

/// One field's value as the client sent it.
#[derive(Debug, Clone, PartialEq)]
enum Value {
    Text(String),
    Number(serde_json::Number),
    Bool(bool),
    Null,
    /// A JSON array or object where a plain value belongs.
    Nested,
    /// Form bytes that are not UTF-8.
    NotUtf8,
}

/// The fields of a request, from its body (and, for DELETE, its query string).
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Fields {
    values: HashMap<String, Value>,
}

/// Where a request's fields may come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Body,
    /// The query string, then the body over it (DELETE).
    QueryAndBody,
}

/// Reads and parses a request's fields.
pub async fn read(request: Request<Incoming>, source: Source) -> Result<(Parts, Fields), ApiError> {
    let (parts, body) = request.into_parts();
    let declared = parts
        .headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let content_type = parts
        .headers
        .get(CONTENT_TYPE)
        .map(|v| v.to_str().unwrap_or("(not text)").to_owned());
    // Before the body is read or invited: a compressed body would otherwise
    // be parsed as it came, and refused for a field it seemed to lack.
    check_encoding(&parts.headers)?;
    // A client that waits for `100 Continue` has sent no body yet: what
    // would be refused once read is refused before it is invited (RFC 9110,
    // 10.1.1). hyper sends the 100 only when the body is first read.
    if expects_continue(&parts.headers) {
        if declared.is_some_and(|n| n > MAX_BODY_BYTES as u64) {
            return Err(ApiError::TooLarge(MAX_BODY_BYTES));
        }
        Media::of(content_type.as_deref())?;
    }
    let bytes = match tokio::time::timeout(BODY_TIMEOUT, collect(body, declared)).await {
        Err(_) => return Err(ApiError::Timeout),
        Ok(result) => result?,
    };
    let mut fields = Fields::default();
    if source == Source::QueryAndBody {
        if let Some(query) = parts.uri.query() {
            fields.extend_form(query.as_bytes())?;
        }
    }
    fields.extend_body(content_type.as_deref(), &bytes)?;
    Ok((parts, fields))
}

/// Refuses a body in a content coding (`gzip`, `br`...): none is decoded
/// here, since no PBX or app compresses a few hundred bytes of form. Only
/// `identity`, or no `Content-Encoding` at all, is read (RFC 9110, 8.4).
/// So is a body in a transfer coding other than `chunked`, which hyper
/// takes off (`gzip, chunked`): 501, as RFC 9112, 6.1 says.
fn check_encoding(headers: &HeaderMap) -> Result<(), ApiError> {
    if let Some(coding) = coding_besides(headers, CONTENT_ENCODING, "identity") {
        return Err(ApiError::UnsupportedEncoding(coding));
    }
    if let Some(coding) = coding_besides(headers, TRANSFER_ENCODING, "chunked") {
        return Err(ApiError::UnsupportedTransferCoding(coding));
    }
    Ok(())
}

/// The first coding the `header` lists that is not `read` (the one coding
/// read), `(not text)` for a value that is not text.
fn coding_besides(headers: &HeaderMap, header: HeaderName, read: &str) -> Option<String> {
    for value in headers.get_all(header) {
        let Ok(text) = value.to_str() else {
            return Some("(not text)".to_owned());
        };
        let coding = text
            .split(',')
            .map(|coding| coding.split(';').next().unwrap_or_default().trim())
            .find(|coding| !coding.is_empty() && !coding.eq_ignore_ascii_case(read));
        if let Some(coding) = coding {
            return Some(coding.to_owned());
        }
    }
    None
}

/// Whether the request waits for `100 Continue` before its body.
fn expects_continue(headers: &HeaderMap) -> bool {
    headers
        .get(EXPECT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("100-continue"))
}

/// How a body is parsed, by its declared content type.
enum Media {
    Json,
    Form,
    /// No type, or `text/plain` (what curl and PBX HTTP functions send):
    /// JSON when it starts with `{`, else a form.
    Sniffed,
}

impl Media {
    fn of(content_type: Option<&str>) -> Result<Media, ApiError> {
        let essence = content_type.map(|ct| {
            ct.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase()
        });
        match essence.as_deref() {
            Some("application/json") => Ok(Media::Json),
            Some(ct) if ct.ends_with("+json") => Ok(Media::Json),
            Some("application/x-www-form-urlencoded") => Ok(Media::Form),
            Some("") | None | Some("text/plain") => Ok(Media::Sniffed),
            Some(other) => Err(ApiError::UnsupportedMediaType(other.to_owned())),
        }
    }
}

/// Reads a body of at most [`MAX_BODY_BYTES`]. A larger one is never kept:
/// it is read and thrown away up to [`DISCARD_BYTES`] and answered 413.
/// Reading it out (rather than answering with it unread) lets the client
/// see the 413: closing a socket with unread data makes the kernel reset
/// the connection, and the client loses the answer.
async fn collect(mut body: Incoming, declared: Option<u64>) -> Result<Bytes, ApiError> {
    let mut kept = Vec::new();
    let mut seen = 0usize;
    let too_large = declared.is_some_and(|n| n > MAX_BODY_BYTES as u64);
    if declared.is_some_and(|n| n > DISCARD_BYTES as u64) {
        return Err(ApiError::TooLarge(MAX_BODY_BYTES));
    }
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| ApiError::Malformed(format!("cannot read the body: {e}")))?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        seen += data.len();
        if seen > DISCARD_BYTES {
            break;
        }
        if !too_large && seen <= MAX_BODY_BYTES {
            kept.extend_from_slice(&data);
        }
    }
    if too_large || seen > MAX_BODY_BYTES {
        return Err(ApiError::TooLarge(MAX_BODY_BYTES));
    }
    Ok(Bytes::from(kept))
}

/// How much of a too-large body is read (and dropped) before answering 413.
const DISCARD_BYTES: usize = 1024 * 1024;

impl Fields {
    /// Parses a body by its declared content type. Without one, a body that
    /// starts with `{` is JSON, anything else a form (what curl and PBX HTTP
    /// functions send).
    pub fn extend_body(
        &mut self,
        content_type: Option<&str>,
        body: &Bytes,
    ) -> Result<(), ApiError> {
        let looks_json = || body.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{');
        match Media::of(content_type)? {
            Media::Json => self.extend_json(body),
            Media::Form => self.extend_form(body),
            Media::Sniffed if body.is_empty() => Ok(()),
            Media::Sniffed if looks_json() => self.extend_json(body),
            Media::Sniffed => self.extend_form(body),
        }
    }

    fn extend_json(&mut self, body: &[u8]) -> Result<(), ApiError> {
        if body.iter().all(u8::is_ascii_whitespace) {
            return Ok(());
        }
        let parsed: serde_json::Value = serde_json::from_slice(body)
            .map_err(|e| ApiError::Malformed(format!("invalid JSON: {e}")))?;
        let serde_json::Value::Object(map) = parsed else {
            return Err(ApiError::Malformed("JSON body must be an object".into()));
        };
        for (name, value) in map {
            let value = match value {
                serde_json::Value::String(s) => Value::Text(s),
                serde_json::Value::Number(n) => Value::Number(n),
                serde_json::Value::Bool(b) => Value::Bool(b),
                serde_json::Value::Null => Value::Null,
                _ => Value::Nested,
            };
            self.values.insert(name, value);
        }
        Ok(())
    }

    fn extend_form(&mut self, body: &[u8]) -> Result<(), ApiError> {
        for pair in body.split(|b| *b == b'&').filter(|p| !p.is_empty()) {
            let (name, value) = match pair.iter().position(|b| *b == b'=') {
                Some(at) => (&pair[..at], &pair[at + 1..]),
                None => (pair, &b""[..]),
            };
            // No field this service reads has such a name: ignored, as
            // every field beyond those listed is.
            let Ok(name) = String::from_utf8(percent_decode(name)) else {
                continue;
            };
            let value = match String::from_utf8(percent_decode(value)) {
                Ok(text) => Value::Text(text),
                Err(_) => Value::NotUtf8,
            };
            self.values.insert(name, value);
        }
        Ok(())
    }

    /// A text field, `None` when absent or null. Numbers are taken as their
    /// text (JSON clients send ids as numbers); longer than `max`
    /// characters is an error.
    pub fn text(&self, field: &'static str, max: usize) -> Result<Option<String>, ApiError> {
        let text = match self.values.get(field) {
            None | Some(Value::Null) => return Ok(None),
            Some(Value::Text(s)) => s.clone(),
            Some(Value::Number(n)) => n.to_string(),
            Some(Value::NotUtf8) => return Err(ApiError::invalid(field, "must be valid UTF-8")),
            Some(Value::Bool(_) | Value::Nested) => {
                return Err(ApiError::invalid(field, "must be a string"))
            }
        };
        if text.chars().count() > max {
            return Err(ApiError::invalid(
                field,
                format!("must be at most {max} characters"),
            ));
        }
        if text.chars().any(|c| c.is_control() && c != '\t') {
            return Err(ApiError::invalid(
                field,
                "must not contain control characters",
            ));
        }
        Ok(Some(text))
    }

    /// A required, non-blank text field.
    pub fn required_text(&self, field: &'static str, max: usize) -> Result<String, ApiError> {
        match self.text(field, max)? {
            None => Err(ApiError::invalid(field, "is required")),
            Some(text) if text.trim().is_empty() => {
                Err(ApiError::invalid(field, "must not be blank"))
            }
            Some(text) => Ok(text),
        }
    }

    /// A required, non-blank text field that must be text, not a JSON
    /// number: push tokens and app ids are never numbers, and a token sent
    /// as one has lost digits already (64 hex digits do not fit a float).
    pub fn required_string(&self, field: &'static str, max: usize) -> Result<String, ApiError> {
        if let Some(Value::Number(_)) = self.values.get(field) {
            return Err(ApiError::invalid(field, "must be a string"));
        }
        self.required_text(field, max)
    }

    /// An optional text field; blank counts as absent.
    pub fn optional_text(
        &self,
        field: &'static str,
        max: usize,
    ) -> Result<Option<String>, ApiError> {
        Ok(self.text(field, max)?.filter(|t| !t.trim().is_empty()))
    }

    /// The PBX's `call_id`, at most 255 characters: empty (or absent) is
    /// none, and the call gets a random key; blank is refused, since the
    /// PBX could never cancel the call by it.
    pub fn call_id(&self) -> Result<Option<String>, ApiError> {
        match self.text("call_id", 255)? {
            Some(text) if text.is_empty() => Ok(None),
            Some(text) if text.trim().is_empty() => Err(ApiError::invalid(
                "call_id",
                "must not be blank: leave it empty for a random key",
            )),
            given => Ok(given),
        }
    }

    /// `sip_user_id` where it may be left out: absent (or JSON `null`, as
    /// every optional field) is none; given, it must be one (a cancel that
    /// names an account must name it right).
    pub fn optional_sip_user_id(&self) -> Result<Option<i64>, ApiError> {
        match self.values.get("sip_user_id") {
            None | Some(Value::Null) => Ok(None),
            Some(_) => self.sip_user_id().map(Some),
        }
    }

    /// `sip_user_id`: a required positive 64-bit integer.
    pub fn sip_user_id(&self) -> Result<i64, ApiError> {
        self.integer(
            "sip_user_id",
            1..=i64::MAX,
            "must be a positive 64-bit integer",
        )
    }

    /// A required integer within `range`: a JSON integer, or its digits as
    /// text (no sign, no point: what a PBX or proxy substitutes into a
    /// form). Anything else breaks `rule`.
    pub fn integer(
        &self,
        field: &'static str,
        range: std::ops::RangeInclusive<i64>,
        rule: &'static str,
    ) -> Result<i64, ApiError> {
        let value = match self.values.get(field) {
            None | Some(Value::Null) => return Err(ApiError::invalid(field, "is required")),
            Some(Value::Number(n)) => n.as_i64(),
            Some(Value::Text(s)) if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) => {
                s.parse::<i64>().ok()
            }
            Some(_) => None,
        };
        value
            .filter(|v| range.contains(v))
            .ok_or_else(|| ApiError::invalid(field, rule))
    }

    /// A boolean, `default` when absent. Accepts JSON booleans, 1/0, and the
    /// spellings true/false, yes/no, on/off in any case.
    pub fn boolean(&self, field: &'static str, default: bool) -> Result<bool, ApiError> {
        const RULE: &str = "must be a boolean (true/false, 1/0, yes/no, on/off)";
        match self.values.get(field) {
            None | Some(Value::Null) => Ok(default),
            Some(Value::Bool(b)) => Ok(*b),
            Some(Value::Number(n)) => match n.as_u64() {
                Some(1) => Ok(true),
                Some(0) => Ok(false),
                _ => Err(ApiError::invalid(field, RULE)),
            },
            Some(Value::Text(s)) => match s.trim().to_ascii_lowercase().as_str() {
                "true" | "1" | "yes" | "on" => Ok(true),
                "false" | "0" | "no" | "off" => Ok(false),
                _ => Err(ApiError::invalid(field, RULE)),
            },
            Some(_) => Err(ApiError::invalid(field, RULE)),
        }
    }

    /// Required Unix seconds (`message_start_time`, ours, echoed back): a
    /// JSON number from 0 to before the year 5000, or its text in the forms
    /// apps print a time in: plain digits with at most 10 before the point
    /// (`1700000000.25`), or one digit and an exponent of at most 9 (Java's
    /// `1.70000000025E9`), white space around it allowed. Text is held to
    /// those forms, not to whatever a float parser takes, so that the API
    /// document can say exactly which text is taken: a pattern cannot tell
    /// `1e9` from `1e99`.
    pub fn unix_seconds(&self, field: &'static str) -> Result<f64, ApiError> {
        const RULE: &str = "must be Unix seconds: a number from 0 to before the year 5000, \
                            or as text at most 10 digits before the point (or 1 digit and an exponent of at most 9)";
        let value = match self.values.get(field) {
            None | Some(Value::Null) => return Err(ApiError::invalid(field, "is required")),
            Some(Value::Number(n)) => n.as_f64(),
            Some(Value::Text(s)) => unix_seconds_text(s),
            Some(_) => None,
        };
        value
            .filter(|v| (0.0..MAX_UNIX_SECONDS).contains(v))
            .ok_or_else(|| ApiError::invalid(field, RULE))
    }
}

/// Unix seconds before the year 5000: later is not a time of ours.
const MAX_UNIX_SECONDS: f64 = 95_617_584_000.0;

/// Unix seconds as text, in the forms [`Fields::unix_seconds`] takes;
/// `None` for anything else. Every form taken is below 10^10.
fn unix_seconds_text(text: &str) -> Option<f64> {
    let trimmed = text.trim();
    let unsigned = trimmed.strip_prefix('+').unwrap_or(trimmed);
    let digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    let (mantissa, exponent) = match unsigned.split_once(['e', 'E']) {
        Some((mantissa, exponent)) => (mantissa, Some(exponent)),
        None => (unsigned, None),
    };
    let (whole, fraction) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    if !digits(whole) || !digits(fraction) || (whole.is_empty() && fraction.is_empty()) {
        return None;
    }
    let significant = whole.trim_start_matches('0').len();
    let in_form = match exponent {
        None => significant <= 10,
        Some(exponent) => match exponent.strip_prefix('-') {
            Some(negative) => !negative.is_empty() && digits(negative) && significant <= 10,
            None => {
                let positive = exponent.strip_prefix('+').unwrap_or(exponent);
                !positive.is_empty()
                    && digits(positive)
                    && positive.trim_start_matches('0').len() <= 1
                    && significant <= 1
            }
        },
    };
    in_form.then(|| unsigned.parse::<f64>().ok()).flatten()
}

/// Decodes `+` and `%XX` escapes of a form component into bytes. A `%`
/// that begins no escape stays as it is, as the Django service read it
/// (Python's `unquote`): a dialplan that posts a caller's name unescaped,
/// `100% Sales`, rings as it did.
fn percent_decode(raw: &[u8]) -> Vec<u8> {
    let hex = |b: Option<&u8>| b.and_then(|b| (*b as char).to_digit(16));
    let mut out = Vec::with_capacity(raw.len());
    let mut at = 0;
    while let Some(&b) = raw.get(at) {
        at += 1;
        match b {
            b'+' => out.push(b' '),
            b'%' => match (hex(raw.get(at)), hex(raw.get(at + 1))) {
                (Some(hi), Some(lo)) => {
                    out.push((hi * 16 + lo) as u8);
                    at += 2;
                }
                _ => out.push(b'%'),
            },
            b => out.push(b),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn form(body: &str) -> Fields {
        let mut f = Fields::default();
        f.extend_body(
            Some("application/x-www-form-urlencoded"),
            &Bytes::from(body.to_owned()),
        )
        .expect("valid form");
        f
    }

    #[test]
    fn form_and_json_give_the_same_fields() {
        let mut json = Fields::default();
        json.extend_body(
            Some("application/json"),
            &Bytes::from_static(br#"{"sip_user_id": 42, "token": "a b", "sandbox": true}"#),
        )
        .expect("valid json");
        let form = form("sip_user_id=42&token=a+b&sandbox=true");
        for f in [&json, &form] {
            assert_eq!(f.sip_user_id().unwrap(), 42);
            assert_eq!(f.text("token", 10).unwrap().as_deref(), Some("a b"));
            assert!(f.boolean("sandbox", false).unwrap());
        }
    }

    #[test]
    fn sip_user_id_rules() {
        for bad in ["0", "-1", "1.5", "", "abc", "99999999999999999999", " 1"] {
            let err = form(&format!("sip_user_id={bad}"))
                .sip_user_id()
                .unwrap_err();
            assert!(
                matches!(
                    err,
                    ApiError::Invalid {
                        field: "sip_user_id",
                        ..
                    }
                ),
                "{bad}"
            );
        }
        assert_eq!(
            form("sip_user_id=9223372036854775807")
                .sip_user_id()
                .unwrap(),
            i64::MAX
        );
    }

    #[test]
    fn an_optional_sip_user_id_may_be_absent_or_null_but_not_wrong() {
        let json = |body: &'static str| {
            let mut f = Fields::default();
            f.extend_body(
                Some("application/json"),
                &Bytes::from_static(body.as_bytes()),
            )
            .expect("valid json");
            f
        };
        assert_eq!(
            json(r#"{"call_id": "c1"}"#).optional_sip_user_id().unwrap(),
            None
        );
        assert_eq!(
            json(r#"{"call_id": "c1", "sip_user_id": null}"#)
                .optional_sip_user_id()
                .unwrap(),
            None
        );
        assert_eq!(
            json(r#"{"sip_user_id": 42}"#)
                .optional_sip_user_id()
                .unwrap(),
            Some(42)
        );
        for bad in [r#"{"sip_user_id": 0}"#, r#"{"sip_user_id": "x"}"#] {
            assert!(json(bad).optional_sip_user_id().is_err(), "{bad}");
        }
        assert!(form("sip_user_id=").optional_sip_user_id().is_err());
    }

    /// As Django read a form: a `%` that begins no escape is text, and a
    /// field whose name is not UTF-8 is one more field nobody reads.
    #[test]
    fn a_stray_percent_sign_is_text() {
        let f = form("caller_id=100%25+%zz+1%&%FF=x&phonenumber=%2");
        assert_eq!(
            f.text("caller_id", 255).unwrap().as_deref(),
            Some("100% %zz 1%")
        );
        assert_eq!(f.text("phonenumber", 32).unwrap().as_deref(), Some("%2"));
    }

    #[test]
    fn non_utf8_form_values_name_their_field() {
        let mut f = Fields::default();
        f.extend_body(None, &Bytes::from_static(b"token=%FF%FE"))
            .unwrap();
        let err = f.text("token", 250).unwrap_err();
        assert!(matches!(err, ApiError::Invalid { field: "token", .. }));
    }

    #[test]
    fn unix_seconds_forms() {
        for ok in [
            "1700000000.25",
            " 1700000000 ",
            "%2B1.5",
            "5.",
            ".5",
            "0000000001700000000",
            "1.70000000025E9",
            "1.7e%2B09",
            "1700000000.25e-3",
            "0",
        ] {
            assert!(form(&format!("t={ok}")).unix_seconds("t").is_ok(), "{ok}");
        }
        for bad in [
            "NaN",
            "inf",
            "-inf",
            "1e999",
            "x",
            "",
            ".",
            "-5",
            "-0",
            "1e10",
            "17e8",
            "12345678901",
            ".4e30761",
            "1e",
            "1e-",
            "1.5.5",
            "0x10",
        ] {
            assert!(
                form(&format!("t={bad}")).unix_seconds("t").is_err(),
                "{bad}"
            );
        }
        assert_eq!(form("t=1.25").unix_seconds("t").unwrap(), 1.25);
    }

    proptest! {
        /// Whatever bytes arrive under whatever content type, parsing and
        /// every accessor return a value or a client error, never a panic.
        #[test]
        fn parsers_never_panic(body in proptest::collection::vec(any::<u8>(), 0..256),
                               ct in prop_oneof![Just(None), Just(Some("application/json")),
                                                 Just(Some("application/x-www-form-urlencoded")),
                                                 Just(Some("text/plain"))]) {
            let mut f = Fields::default();
            if f.extend_body(ct, &Bytes::from(body)).is_ok() {
                let _ = f.sip_user_id();
                let _ = f.text("token", 250);
                let _ = f.boolean("sandbox", false);
                let _ = f.unix_seconds("message_start_time");
            }
        }

        /// Any printable value survives a form round trip unchanged.
        #[test]
        fn form_round_trip(value in "[ -~]{0,64}") {
            let encoded: String = value.bytes().map(|b| format!("%{b:02X}")).collect();
            let f = form(&format!("v={encoded}"));
            prop_assert_eq!(f.text("v", 64).unwrap(), Some(value));
        }
    }
}
