//! `slmc serve BUNDLE`: an OpenAI-compatible local server (`/v1/chat/completions`,
//! `/v1/completions`, `/v1/models`, `/health`) over any bundle this machine runs.
//!
//! The bundle is verified and its executor opened on one worker thread before the port
//! opens; that thread owns the executor (GPU and ONNX executors are not shared across
//! threads) and runs one request at a time. Requests wait in a bounded queue and get HTTP
//! 429 past it. Tokens travel to the HTTP side over a channel; when a client goes away its
//! receiver is dropped, the next send fails and generation stops there.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, Context, Result};
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};
use slmc_compiler::import::tokenizer::render_chat;
use slmc_runtime::sample::Sampling;
use slmc_runtime::{generate_with, GenerateOptions};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

use super::args::{Common, OptArgs, RunArgs};
use super::run::{artifact_executor, LoadedArtifact, ABSTENTION_TEXT};
use super::serve_api::{parse_request, ApiError, Kind, Request};

#[derive(clap::Args, Clone)]
pub(crate) struct ServeArgs {
    #[command(flatten)]
    pub(crate) common: Common,
    #[command(flatten)]
    pub(crate) run: RunArgs,
    /// Address to listen on (loopback unless you say otherwise).
    #[arg(long, default_value = "127.0.0.1")]
    pub(crate) host: String,
    /// Port (0: a free one; the address is printed on stdout once listening).
    #[arg(long, default_value_t = 8080)]
    pub(crate) port: u16,
    /// Require `Authorization: Bearer KEY` (else $SLMC_API_KEY; neither: no key).
    #[arg(long)]
    pub(crate) api_key: Option<String>,
    /// Requests that may wait while one runs; more get HTTP 429.
    #[arg(long, default_value_t = 8)]
    pub(crate) queue_depth: usize,
    /// The most tokens one request may generate.
    #[arg(long, default_value_t = 2048)]
    pub(crate) max_tokens_limit: usize,
    /// Serve the browser page instead of the API: a `webgpu` bundle runs on the page's own
    /// GPU through WebGPU (the page checks every file's sha256, and the signature with
    /// --pubkey).
    #[arg(long)]
    pub(crate) web: bool,
    /// The built browser runtime (index.html, slmc-web.js; else $SLMC_WEB_DIR, else
    /// runtime/web/dist of this source tree, built by scripts/build-web).
    #[arg(long, requires = "web")]
    pub(crate) web_root: Option<std::path::PathBuf>,
}

/// What the worker reports for one request.
pub(crate) enum Ev {
    /// New text (and, with logprobs, each new token's text and log-probability).
    Delta { text: String, tokens: Vec<TokenLogprob> },
    /// The end; `confidence` (exp of the mean log-probability) when tokens were scored.
    Done { finish_reason: &'static str, prompt_tokens: usize, completion_tokens: usize, confidence: Option<f64> },
    /// The request could not run (its prompt is too long for the context, for example).
    Failed(String),
}

/// A generated token's text and log-probability, and (with `top_logprobs`) the most likely
/// tokens of its step with theirs, most likely first.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct TokenLogprob {
    text: String,
    logprob: f64,
    top: Vec<(String, f64)>,
}

struct Job {
    request: Request,
    events: UnboundedSender<Ev>,
}

struct Shared {
    jobs: SyncSender<Job>,
    model_id: String,
    api_key: Option<String>,
    queue_depth: usize,
    max_tokens_limit: usize,
    next_id: AtomicU64,
}

pub(crate) fn serve(args: &ServeArgs) -> Result<()> {
    if args.web {
        return super::serve_web::serve_web(args);
    }
    let (jobs, queue) = sync_channel::<Job>(args.queue_depth);
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<String, String>>();
    let (common, run) = (args.common.clone(), args.run.clone());
    std::thread::Builder::new()
        .name("slmc-serve-worker".into())
        .spawn(move || worker(&common, &run, queue, ready_tx))
        .context("starting the worker thread")?;
    // The bundle is verified and opened before the port opens.
    let model_id = ready_rx.recv().map_err(|_| anyhow!("the worker stopped"))?.map_err(|e| anyhow!(e))?;
    let api_key = args.api_key.clone().or_else(|| std::env::var("SLMC_API_KEY").ok()).filter(|k| !k.is_empty());
    let shared = Arc::new(Shared {
        jobs,
        model_id: model_id.clone(),
        api_key,
        queue_depth: args.queue_depth,
        max_tokens_limit: args.max_tokens_limit,
        next_id: AtomicU64::new(1),
    });
    let app = Router::new()
        .route("/health", get(health))
        .route("/v1/models", get(models))
        .route("/v1/chat/completions", post(|s, h, b| complete(s, h, b, Kind::Chat)))
        .route("/v1/completions", post(|s, h, b| complete(s, h, b, Kind::Text)))
        .fallback(|| async { ApiError::not_found("no such endpoint").into_response() })
        .with_state(shared);
    listen_and_serve(args, app, &format!("model {model_id}"))
}

/// Binds `--host`/`--port`, prints the address on stdout (tests and scripts read it), and
/// serves `app` until Ctrl-C; `what`: what the line says is served.
pub(crate) fn listen_and_serve(args: &ServeArgs, app: Router, what: &str) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind((args.host.as_str(), args.port))
            .await
            .with_context(|| format!("listening on {}:{}", args.host, args.port))?;
        let addr = listener.local_addr()?;
        println!("slmc serve: listening on http://{addr} ({what})");
        use std::io::Write;
        std::io::stdout().flush()?;
        axum::serve(listener, app)
            .with_graceful_shutdown(async {
                let _ = tokio::signal::ctrl_c().await;
            })
            .await
            .context("serving")
    })
}

/// Opens the bundle, reports ready (or why not), then runs requests one by one.
fn worker(
    common: &Common,
    run: &RunArgs,
    queue: Receiver<Job>,
    ready: std::sync::mpsc::Sender<Result<String, String>>,
) {
    let opened = artifact_executor(common, run, &OptArgs::default()).and_then(|a| {
        a.ok_or_else(|| {
            anyhow!("serve runs a compiled bundle (a directory with artifact.json); compile the model first")
        })
    });
    let mut loaded = match opened {
        Ok(l) => l,
        Err(e) => {
            let _ = ready.send(Err(format!("{e:#}")));
            return;
        }
    };
    if let Err(e) = loaded.side.tokenizer.as_ref() {
        let _ = ready.send(Err(format!("{}: {e}", loaded.side.origin.display())));
        return;
    }
    let id = model_id(&loaded);
    let _ = ready.send(Ok(id));
    for job in queue {
        let events = job.events.clone();
        if let Err(e) = run_job(&mut loaded, job) {
            let _ = events.send(Ev::Failed(format!("{e:#}")));
        }
    }
}

/// The bundle's model name from its manifest, else its directory's name.
fn model_id(loaded: &LoadedArtifact) -> String {
    match &loaded.bundle {
        Some(b) => b.manifest.model.name.clone(),
        None => loaded.side.origin.file_name().map_or("slmc-artifact".into(), |n| n.to_string_lossy().into_owned()),
    }
}

fn run_job(loaded: &mut LoadedArtifact, job: Job) -> Result<()> {
    let Job { request, events } = job;
    let side = &loaded.side;
    let tok = side.tokenizer.as_ref().map_err(|e| anyhow!("{e}"))?;
    let prompt_ids = match &request.messages {
        Some(messages) => {
            let template = side.chat_template.as_deref().ok_or_else(|| anyhow!("the model has no chat template"))?;
            let text = render_chat(template, messages, side.bos_token.as_deref(), side.eos_token.as_deref())
                .map_err(|e| anyhow!(e))?;
            tok.encode(text.as_str(), false).map_err(|e| anyhow!("tokenizing: {e}"))?.get_ids().to_vec()
        }
        None => tok.encode(request.prompt.as_str(), true).map_err(|e| anyhow!("tokenizing: {e}"))?.get_ids().to_vec(),
    };
    let opts = GenerateOptions {
        max_new_tokens: request.max_tokens,
        stop_ids: side.eos_ids.clone(),
        confidence: request.logprobs || request.abstain_below.is_some(),
        // Every step's top tokens, when alternatives were asked for.
        record_steps: if request.top_logprobs > 0 { usize::MAX } else { 0 },
        record_top_k: request.top_logprobs,
        sampling: (request.temperature > 0.0).then_some(Sampling {
            temperature: request.temperature,
            top_p: request.top_p,
            top_k: request.top_k,
            seed: request.seed,
        }),
        ..Default::default()
    };
    let mut text = TextStream::new(request.stop.clone());
    let mut finish = "length";
    let mut ids: Vec<u32> = Vec::new();
    let (mut gone, mut at_stop_sequence) = (false, false);
    let generation = generate_with(loaded.exec.as_mut(), &prompt_ids, &opts, |id, logprob, step| {
        if side.eos_ids.contains(&id) {
            finish = "stop";
            return false;
        }
        ids.push(id);
        let decoded = tok.decode(&ids, true).unwrap_or_default();
        let piece_text = |id: u32| tok.decode(&[id], true).unwrap_or_default();
        let piece = logprob.map(|logprob| TokenLogprob {
            text: piece_text(id),
            logprob,
            top: step
                .map(|s| s.top_logprobs().into_iter().map(|(t, lp)| (piece_text(t), lp)).collect())
                .unwrap_or_default(),
        });
        let (delta, stopped) = text.push(&decoded, piece);
        if stopped {
            (finish, at_stop_sequence) = ("stop", true);
        }
        if let Some(delta) = delta {
            gone = events.send(delta).is_err();
        }
        !stopped && !gone
    })?;
    if gone {
        return Ok(());
    }
    // Text held back for a stop sequence that never came (nothing after one that did).
    if !at_stop_sequence {
        if let Some(rest) = text.flush() {
            let _ = events.send(rest);
        }
    }
    let completion_tokens = generation.generated.iter().filter(|t| !side.eos_ids.contains(t)).count();
    let _ = events.send(Ev::Done {
        finish_reason: finish,
        prompt_tokens: prompt_ids.len(),
        completion_tokens,
        confidence: generation.confidence(),
    });
    Ok(())
}

/// Turns the decoded text so far into deltas: holds back an incomplete character (the
/// decoder's U+FFFD) and any tail that could still become a stop sequence, and ends the
/// text before the first stop sequence.
struct TextStream {
    stop: Vec<String>,
    sent: usize,
    latest: String,
    pending: Vec<TokenLogprob>,
}

impl TextStream {
    fn new(stop: Vec<String>) -> TextStream {
        TextStream { stop, sent: 0, latest: String::new(), pending: Vec::new() }
    }

    /// The delta to send now, and whether a stop sequence ended the text.
    fn push(&mut self, decoded: &str, piece: Option<TokenLogprob>) -> (Option<Ev>, bool) {
        self.latest = decoded.to_string();
        self.pending.extend(piece);
        let from = self.sent.saturating_sub(self.stop.iter().map(|s| s.len()).max().unwrap_or(0));
        let from = floor_boundary(decoded, from);
        if let Some(at) = self.stop.iter().filter_map(|s| decoded[from..].find(s.as_str()).map(|p| from + p)).min() {
            let end = at.max(self.sent);
            let delta = self.delta_to(end);
            self.sent = end;
            return (delta, true);
        }
        let mut end = decoded.len();
        if decoded.ends_with('\u{FFFD}') {
            end -= '\u{FFFD}'.len_utf8();
        }
        // Keep back the longest tail that is a proper prefix of a stop sequence.
        let held = self
            .stop
            .iter()
            .flat_map(|s| (1..s.len()).rev().filter(move |n| s.is_char_boundary(*n)).map(move |n| &s[..n]))
            .filter(|p| decoded[..end].ends_with(*p))
            .map(|p| p.len())
            .max()
            .unwrap_or(0);
        let end = floor_boundary(decoded, end - held).max(self.sent);
        let delta = self.delta_to(end);
        self.sent = end;
        (delta, false)
    }

    fn delta_to(&mut self, end: usize) -> Option<Ev> {
        if end <= self.sent && self.pending.is_empty() {
            return None;
        }
        let text = self.latest.get(self.sent..end).unwrap_or_default().to_string();
        Some(Ev::Delta { text, tokens: std::mem::take(&mut self.pending) })
    }

    /// What was held back, at the end of generation.
    fn flush(&mut self) -> Option<Ev> {
        let mut end = self.latest.len();
        if self.latest.ends_with('\u{FFFD}') {
            end -= '\u{FFFD}'.len_utf8();
        }
        let delta = self.delta_to(end.max(self.sent));
        self.sent = end.max(self.sent);
        delta
    }
}

fn floor_boundary(s: &str, mut i: usize) -> usize {
    i = i.min(s.len());
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

async fn health(State(shared): State<Arc<Shared>>) -> Json<Value> {
    Json(json!({ "status": "ok", "model": shared.model_id, "queue_depth": shared.queue_depth }))
}

async fn models(State(shared): State<Arc<Shared>>, headers: HeaderMap) -> Response {
    if let Err(e) = authorize(&shared, &headers) {
        return e.into_response();
    }
    Json(json!({
        "object": "list",
        "data": [{ "id": shared.model_id, "object": "model", "created": 0, "owned_by": "slmc" }],
    }))
    .into_response()
}

fn authorize(shared: &Shared, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(key) = &shared.api_key else { return Ok(()) };
    let given = headers.get("authorization").and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
    match given {
        Some(g) if g == key => Ok(()),
        _ => Err(ApiError::unauthorized()),
    }
}

async fn complete(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
    kind: Kind,
) -> Response {
    if let Err(e) = authorize(&shared, &headers) {
        return e.into_response();
    }
    let request = match parse_request(&body, kind, shared.max_tokens_limit) {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    let (events, mut receiver) = unbounded_channel();
    let (stream, logprobs, abstain_below) = (request.stream, request.logprobs, request.abstain_below);
    let top_logprobs = request.top_logprobs > 0;
    match shared.jobs.try_send(Job { request, events }) {
        Ok(()) => {}
        Err(TrySendError::Full(_)) => return ApiError::queue_full(shared.queue_depth).into_response(),
        Err(TrySendError::Disconnected(_)) => return ApiError::unavailable().into_response(),
    }
    let id = format!(
        "{}-{}",
        if kind == Kind::Chat { "chatcmpl" } else { "cmpl" },
        shared.next_id.fetch_add(1, Ordering::Relaxed)
    );
    let created = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let meta = Meta { id, created, model: shared.model_id.clone(), kind, logprobs, top_logprobs };
    if stream {
        return sse(receiver, meta).into_response();
    }
    let (mut text, mut tokens) = (String::new(), Vec::new());
    while let Some(ev) = receiver.recv().await {
        match ev {
            Ev::Delta { text: t, tokens: k } => {
                text.push_str(&t);
                tokens.extend(k);
            }
            Ev::Failed(message) => return ApiError::bad_request(&message, None).into_response(),
            Ev::Done { finish_reason, prompt_tokens, completion_tokens, confidence } => {
                // As `slmc run --abstain-below`: a low-confidence answer is withheld.
                let abstained = matches!((abstain_below, confidence), (Some(t), Some(c)) if c < t);
                let shown = if abstained { ABSTENTION_TEXT } else { text.as_str() };
                let mut body = meta.whole(shown, &tokens, finish_reason, prompt_tokens, completion_tokens);
                if confidence.is_some() {
                    body["confidence"] = json!(confidence);
                    body["abstained"] = json!(abstained);
                }
                return Json(body).into_response();
            }
        }
    }
    ApiError::unavailable().into_response()
}

/// What every response object repeats.
struct Meta {
    id: String,
    created: u64,
    model: String,
    kind: Kind,
    logprobs: bool,
    /// Alternatives were asked for (`top_logprobs`, or a completion's `logprobs` count).
    top_logprobs: bool,
}

impl Meta {
    fn logprobs_json(&self, tokens: &[TokenLogprob]) -> Value {
        if !self.logprobs {
            return Value::Null;
        }
        match self.kind {
            Kind::Chat => json!({ "content": tokens.iter().map(|t| json!({
                "token": t.text, "logprob": t.logprob, "bytes": t.text.as_bytes(),
                "top_logprobs": t.top.iter().map(|(text, lp)| json!({
                    "token": text, "logprob": lp, "bytes": text.as_bytes(),
                })).collect::<Vec<_>>(),
            })).collect::<Vec<_>>() }),
            // Completions: one {token: logprob} map per position (tokens whose text
            // coincides keep the likelier entry, as a map must).
            Kind::Text => json!({
                "tokens": tokens.iter().map(|t| &t.text).collect::<Vec<_>>(),
                "token_logprobs": tokens.iter().map(|t| t.logprob).collect::<Vec<_>>(),
                "top_logprobs": if self.top_logprobs { json!(tokens.iter().map(|t| {
                    let mut map = serde_json::Map::new();
                    for (text, lp) in &t.top {
                        map.entry(text.clone()).or_insert(json!(lp));
                    }
                    map
                }).collect::<Vec<_>>()) } else { Value::Null },
                "text_offset": Value::Null,
            }),
        }
    }

    fn usage(prompt: usize, completion: usize) -> Value {
        json!({ "prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion })
    }

    fn whole(&self, text: &str, tokens: &[TokenLogprob], finish: &str, prompt: usize, completion: usize) -> Value {
        let choice = match self.kind {
            Kind::Chat => json!({
                "index": 0,
                "message": { "role": "assistant", "content": text },
                "finish_reason": finish,
                "logprobs": self.logprobs_json(tokens),
            }),
            Kind::Text => {
                json!({ "index": 0, "text": text, "finish_reason": finish, "logprobs": self.logprobs_json(tokens) })
            }
        };
        json!({
            "id": self.id,
            "object": if self.kind == Kind::Chat { "chat.completion" } else { "text_completion" },
            "created": self.created,
            "model": self.model,
            "choices": [choice],
            "usage": Meta::usage(prompt, completion),
        })
    }

    fn chunk(&self, text: Option<&str>, tokens: &[TokenLogprob], finish: Option<&str>, usage: Option<Value>) -> Value {
        let choice = match self.kind {
            Kind::Chat => {
                let delta = match text {
                    Some(t) => json!({ "role": "assistant", "content": t }),
                    None => json!({}),
                };
                json!({ "index": 0, "delta": delta, "finish_reason": finish, "logprobs": self.logprobs_json(tokens) })
            }
            Kind::Text => json!({
                "index": 0, "text": text.unwrap_or(""), "finish_reason": finish, "logprobs": self.logprobs_json(tokens),
            }),
        };
        json!({
            "id": self.id,
            "object": if self.kind == Kind::Chat { "chat.completion.chunk" } else { "text_completion" },
            "created": self.created,
            "model": self.model,
            "choices": [choice],
            "usage": usage,
        })
    }
}

/// Server-sent events: one chunk per delta, a last chunk with the finish reason and usage,
/// then `[DONE]`. Dropping the stream (the client left) drops the receiver.
fn sse(
    receiver: UnboundedReceiver<Ev>,
    meta: Meta,
) -> Sse<impl futures_util::Stream<Item = Result<Event, std::convert::Infallible>>> {
    // Stage 0: chunks; 1: `[DONE]` is next; 2: over.
    let state = (receiver, meta, 0u8);
    let stream = futures_util::stream::unfold(state, |(mut rx, meta, stage)| async move {
        match stage {
            1 => return Some((Ok(Event::default().data("[DONE]")), (rx, meta, 2))),
            2 => return None,
            _ => {}
        }
        let (event, next) = match rx.recv().await {
            Some(Ev::Delta { text, tokens }) => (meta.chunk(Some(&text), &tokens, None, None), 0),
            Some(Ev::Done { finish_reason, prompt_tokens, completion_tokens, .. }) => {
                let usage = Meta::usage(prompt_tokens, completion_tokens);
                (meta.chunk(None, &[], Some(finish_reason), Some(usage)), 1)
            }
            Some(Ev::Failed(message)) => (json!({ "error": { "message": message, "type": "server_error" } }), 2),
            None => return None,
        };
        Some((Ok(Event::default().data(event.to_string())), (rx, meta, next)))
    });
    Sse::new(stream)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text_of(ev: Option<Ev>) -> String {
        match ev {
            Some(Ev::Delta { text, .. }) => text,
            None => String::new(),
            Some(_) => panic!("a delta or nothing"),
        }
    }

    #[test]
    fn text_stream_holds_back_stop_prefixes_and_cuts_at_stops() {
        let mut t = TextStream::new(vec!["END".into()]);
        let mut out = String::new();
        for decoded in ["Hello", "Hello E", "Hello EN", "Hello ENX"] {
            let (d, stopped) = t.push(decoded, None);
            assert!(!stopped);
            out += &text_of(d);
        }
        assert_eq!(out, "Hello ENX", "`EN` waits until `X` shows it is no stop");
        let mut t = TextStream::new(vec!["nope".into(), "END".into()]);
        let mut out = String::new();
        for decoded in ["Hi E", "Hi EN", "Hi END more"] {
            let (d, stopped) = t.push(decoded, None);
            out += &text_of(d);
            if stopped {
                break;
            }
        }
        assert_eq!(out, "Hi ");
        // An incomplete character waits for its remaining bytes; nothing is sent twice.
        let mut t = TextStream::new(vec![]);
        assert_eq!(text_of(t.push("caf\u{FFFD}", None).0), "caf");
        assert_eq!(text_of(t.push("café", None).0), "é");
        assert!(t.flush().is_none());
        // Token log-probabilities travel with the text they belong to.
        let mut t = TextStream::new(vec!["!".into()]);
        let piece = TokenLogprob { text: "a".into(), logprob: -0.5, top: vec![("a".into(), -0.5)] };
        match t.push("a", Some(piece)).0 {
            Some(Ev::Delta { text, tokens }) => assert_eq!((text.as_str(), tokens.len()), ("a", 1)),
            _ => panic!("a delta"),
        }
    }
}
