//! The OpenAI request bodies `slmc serve` accepts, checked field by field, and its errors
//! in OpenAI's shape (`{"error": {"message", "type", "param", "code"}}`).

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};
use slmc_compiler::import::tokenizer::Message;

/// Which endpoint: chat messages or a plain prompt.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Kind {
    Chat,
    Text,
}

/// A checked request.
#[derive(Debug)]
pub(crate) struct Request {
    /// Chat: the messages (rendered with the model's template); text: `prompt`.
    pub(crate) messages: Option<Vec<Message>>,
    pub(crate) prompt: String,
    pub(crate) max_tokens: usize,
    pub(crate) temperature: f32,
    pub(crate) top_p: f32,
    pub(crate) top_k: usize,
    pub(crate) seed: u64,
    pub(crate) stop: Vec<String>,
    pub(crate) stream: bool,
    pub(crate) logprobs: bool,
    /// How many most likely tokens to list at each position (chat: `top_logprobs`, at most
    /// 20; completions: the `logprobs` count, at most 5).
    pub(crate) top_logprobs: usize,
    /// An extension: answer with the abstention when the sequence confidence (see
    /// `slmc run --abstain-below`) is below this; whole answers only.
    pub(crate) abstain_below: Option<f64>,
}

/// The most stop sequences a request may give (OpenAI's limit).
const MAX_STOP: usize = 4;
/// The longest prompt or message text accepted, in bytes (a bound before tokenizing).
const MAX_TEXT_BYTES: usize = 1 << 20;

pub(crate) fn parse_request(body: &[u8], kind: Kind, max_tokens_limit: usize) -> Result<Request, ApiError> {
    let v: Value =
        serde_json::from_slice(body).map_err(|e| ApiError::bad_request(&format!("the body is not JSON: {e}"), None))?;
    let obj = v.as_object().ok_or_else(|| ApiError::bad_request("the body is not a JSON object", None))?;
    let number = |key: &str| -> Result<Option<f64>, ApiError> {
        match obj.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(x) => x
                .as_f64()
                .filter(|f| f.is_finite())
                .map(Some)
                .ok_or_else(|| ApiError::bad_request(&format!("`{key}` must be a number"), Some(key))),
        }
    };
    let flag = |key: &str| -> Result<bool, ApiError> {
        match obj.get(key) {
            None | Some(Value::Null) => Ok(false),
            Some(Value::Bool(b)) => Ok(*b),
            Some(_) => Err(ApiError::bad_request(&format!("`{key}` must be true or false"), Some(key))),
        }
    };
    let integer = |key: &str, lo: f64, hi: f64| -> Result<Option<f64>, ApiError> {
        match number(key)? {
            Some(x) if x.fract() != 0.0 || x < lo || x > hi => {
                Err(ApiError::bad_request(&format!("`{key}` must be an integer from {lo} to {hi}"), Some(key)))
            }
            other => Ok(other),
        }
    };
    let (messages, prompt) = match kind {
        Kind::Chat => (Some(messages(obj.get("messages"))?), String::new()),
        Kind::Text => (None, prompt(obj.get("prompt"))?),
    };
    let limit = max_tokens_limit as f64;
    let default_tokens = if kind == Kind::Text { 16 } else { max_tokens_limit.min(512) };
    let max_tokens = integer("max_completion_tokens", 1.0, limit)?
        .or(integer("max_tokens", 1.0, limit)?)
        .map_or(default_tokens, |x| x as usize);
    if let Some(n) = integer("n", 1.0, 1.0)? {
        debug_assert_eq!(n, 1.0);
    }
    let temperature = number("temperature")?.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(ApiError::bad_request("`temperature` must be from 0 to 2", Some("temperature")));
    }
    let top_p = number("top_p")?.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::bad_request("`top_p` must be above 0 and at most 1", Some("top_p")));
    }
    let top_k = integer("top_k", 0.0, 1e9)?.unwrap_or(0.0) as usize;
    let seed = match obj.get("seed") {
        None | Some(Value::Null) => fresh_seed(),
        Some(x) => x
            .as_i64()
            .map(|s| s as u64)
            .or_else(|| x.as_u64())
            .ok_or_else(|| ApiError::bad_request("`seed` must be an integer", Some("seed")))?,
    };
    let stop = match obj.get("stop") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) if a.len() <= MAX_STOP => a
            .iter()
            .map(|s| s.as_str().map(str::to_string))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| ApiError::bad_request("`stop` must hold strings", Some("stop")))?,
        Some(_) => {
            return Err(ApiError::bad_request(
                &format!("`stop` must be a string or at most {MAX_STOP} strings"),
                Some("stop"),
            ))
        }
    };
    if stop.iter().any(|s| s.is_empty()) {
        return Err(ApiError::bad_request("a stop sequence is empty", Some("stop")));
    }
    let count = |field: &str, most: u64| -> Result<usize, ApiError> {
        match obj.get(field) {
            None | Some(Value::Null) => Ok(0),
            Some(x) => x.as_u64().filter(|n| *n <= most).map(|n| n as usize).ok_or_else(|| {
                ApiError::bad_request(&format!("`{field}` must be an integer from 0 to {most}"), Some(field))
            }),
        }
    };
    let (logprobs, top_logprobs) = match (kind, obj.get("logprobs")) {
        (Kind::Chat, None | Some(Value::Null)) => (false, 0),
        (Kind::Chat, _) => (flag("logprobs")?, 0),
        (Kind::Text, None | Some(Value::Null)) => (false, 0),
        // Completions give a count of alternatives per position (0: the chosen token's only).
        (Kind::Text, Some(Value::Bool(b))) => (*b, 0),
        (Kind::Text, Some(_)) => (true, count("logprobs", 5)?),
    };
    let top_logprobs = match kind {
        Kind::Chat => count("top_logprobs", 20)?,
        Kind::Text => top_logprobs,
    };
    if top_logprobs > 0 && !logprobs {
        return Err(ApiError::bad_request("`top_logprobs` needs `logprobs: true`", Some("top_logprobs")));
    }
    let abstain_below = number("abstain_below")?;
    if abstain_below.is_some_and(|t| !(0.0..=1.0).contains(&t)) {
        return Err(ApiError::bad_request("`abstain_below` must be from 0 to 1", Some("abstain_below")));
    }
    let stream = flag("stream")?;
    if stream && abstain_below.is_some() {
        return Err(ApiError::bad_request(
            "`abstain_below` needs a whole answer (its confidence is known only at the end): drop `stream`",
            Some("abstain_below"),
        ));
    }
    Ok(Request {
        messages,
        prompt,
        max_tokens,
        temperature: temperature as f32,
        top_p: top_p as f32,
        top_k,
        seed,
        stop,
        stream,
        logprobs,
        top_logprobs,
        abstain_below,
    })
}

fn fresh_seed() -> u64 {
    let mut bytes = [0u8; 8];
    // A failed draw still gives a usable (fixed) seed.
    let _ = getrandom::fill(&mut bytes);
    u64::from_le_bytes(bytes)
}

fn messages(v: Option<&Value>) -> Result<Vec<Message>, ApiError> {
    let param = Some("messages");
    let list =
        v.and_then(|m| m.as_array()).ok_or_else(|| ApiError::bad_request("`messages` must be an array", param))?;
    if list.is_empty() {
        return Err(ApiError::bad_request("`messages` is empty", param));
    }
    list.iter()
        .enumerate()
        .map(|(i, m)| {
            let role = m["role"].as_str().unwrap_or_default();
            if !["system", "user", "assistant", "developer"].contains(&role) {
                return Err(ApiError::bad_request(&format!("messages[{i}]: unknown role `{role}`"), param));
            }
            let content = match &m["content"] {
                Value::String(s) => s.clone(),
                // Content parts: the text parts, in order.
                Value::Array(parts) => parts
                    .iter()
                    .map(|p| match (p["type"].as_str(), p["text"].as_str()) {
                        (Some("text"), Some(t)) => Ok(t.to_string()),
                        _ => {
                            Err(ApiError::bad_request(&format!("messages[{i}]: only text content is supported"), param))
                        }
                    })
                    .collect::<Result<Vec<_>, _>>()?
                    .join(""),
                _ => return Err(ApiError::bad_request(&format!("messages[{i}]: `content` must be text"), param)),
            };
            if content.len() > MAX_TEXT_BYTES {
                return Err(ApiError::bad_request(
                    &format!("messages[{i}] is longer than {MAX_TEXT_BYTES} bytes"),
                    param,
                ));
            }
            let role = if role == "developer" { "system" } else { role };
            Ok(Message { role: role.to_string(), content })
        })
        .collect()
}

fn prompt(v: Option<&Value>) -> Result<String, ApiError> {
    let param = Some("prompt");
    let text = match v {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(a)) if a.len() == 1 && a[0].is_string() => a[0].as_str().unwrap_or_default().to_string(),
        _ => return Err(ApiError::bad_request("`prompt` must be a string (one prompt per request)", param)),
    };
    if text.is_empty() || text.len() > MAX_TEXT_BYTES {
        return Err(ApiError::bad_request(&format!("`prompt` must hold 1 to {MAX_TEXT_BYTES} bytes"), param));
    }
    Ok(text)
}

/// An error response in OpenAI's shape.
#[derive(Debug)]
pub(crate) struct ApiError {
    status: StatusCode,
    message: String,
    kind: &'static str,
    param: Option<String>,
    code: Option<&'static str>,
}

impl ApiError {
    pub(crate) fn bad_request(message: &str, param: Option<&str>) -> ApiError {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: message.to_string(),
            kind: "invalid_request_error",
            param: param.map(str::to_string),
            code: None,
        }
    }

    pub(crate) fn unauthorized() -> ApiError {
        ApiError {
            status: StatusCode::UNAUTHORIZED,
            message: "a valid API key is required (Authorization: Bearer KEY)".into(),
            kind: "invalid_request_error",
            param: None,
            code: Some("invalid_api_key"),
        }
    }

    pub(crate) fn queue_full(depth: usize) -> ApiError {
        ApiError {
            status: StatusCode::TOO_MANY_REQUESTS,
            message: format!("the server is busy: {depth} requests are already waiting (--queue-depth); retry later"),
            kind: "rate_limit_error",
            param: None,
            code: Some("queue_full"),
        }
    }

    pub(crate) fn unavailable() -> ApiError {
        ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            message: "the model worker stopped".into(),
            kind: "server_error",
            param: None,
            code: None,
        }
    }

    pub(crate) fn not_found(message: &str) -> ApiError {
        ApiError {
            status: StatusCode::NOT_FOUND,
            message: message.into(),
            kind: "invalid_request_error",
            param: None,
            code: None,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({ "error": {
            "message": self.message, "type": self.kind, "param": self.param, "code": self.code,
        }});
        (self.status, Json(body)).into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(body: Value, kind: Kind) -> Result<Request, String> {
        parse_request(body.to_string().as_bytes(), kind, 100).map_err(|e| e.message)
    }

    #[test]
    fn requests_are_checked_field_by_field() {
        let ok = parse(
            json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "stop": "x", "seed": 3}),
            Kind::Chat,
        )
        .unwrap();
        assert_eq!((ok.max_tokens, ok.stop.clone(), ok.seed, ok.temperature), (5, vec!["x".to_string()], 3, 1.0));
        let text = parse(json!({"prompt": ["once"], "logprobs": 1}), Kind::Text).unwrap();
        assert!(text.logprobs && text.prompt == "once" && text.max_tokens == 16 && text.top_logprobs == 1);
        let chat = json!({"messages": [{"role": "user", "content": "hi"}], "logprobs": true, "top_logprobs": 3});
        assert_eq!(parse(chat, Kind::Chat).unwrap().top_logprobs, 3);
        let user = json!([{"role": "user", "content": "hi"}]);
        for (body, kind, needle) in [
            (json!({}), Kind::Chat, "`messages`"),
            (json!({"messages": []}), Kind::Chat, "empty"),
            (json!({"messages": [{"role": "robot", "content": "x"}]}), Kind::Chat, "unknown role"),
            (json!({"prompt": "x", "max_tokens": 0}), Kind::Text, "max_tokens"),
            (json!({"prompt": "x", "max_tokens": 101}), Kind::Text, "max_tokens"),
            (json!({"prompt": "x", "temperature": 3}), Kind::Text, "temperature"),
            (json!({"prompt": "x", "top_p": 0}), Kind::Text, "top_p"),
            (json!({"prompt": "x", "n": 2}), Kind::Text, "`n`"),
            (json!({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}), Kind::Text, "stop"),
            (json!({"prompt": ["a", "b"]}), Kind::Text, "one prompt"),
            (json!([1, 2]), Kind::Text, "not a JSON object"),
            (json!({"prompt": "x", "abstain_below": 2}), Kind::Text, "abstain_below"),
            (json!({"prompt": "x", "abstain_below": 0.5, "stream": true}), Kind::Text, "whole answer"),
            (json!({"messages": user, "top_logprobs": 2}), Kind::Chat, "needs `logprobs: true`"),
            (json!({"messages": user, "logprobs": true, "top_logprobs": 21}), Kind::Chat, "0 to 20"),
            (json!({"prompt": "x", "logprobs": 6}), Kind::Text, "0 to 5"),
        ] {
            let e = parse(body.clone(), kind).unwrap_err();
            assert!(e.contains(needle), "{body}: {e}");
        }
        assert!(parse_request(b"{not json", Kind::Chat, 10).unwrap_err().message.contains("not JSON"));
    }
}
