//! `slmc serve --web BUNDLE`: serves the browser runtime (`runtime/web`, built by
//! `scripts/build-web`) and a `webgpu` bundle's files, so the model runs on the page's own
//! GPU through WebGPU. The bundle is verified here before the port opens, and the page
//! verifies every file again (sha256 with WebCrypto, the signature when a key is
//! configured): bundle files are read from disk per request, as a static host serves them,
//! so a file altered after start-up reaches the page altered and the page refuses it.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{anyhow, bail, Result};
use axum::extract::{Path as UrlPath, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Value};
use slmc_targets::artifact::GPU_ARTIFACT_FORMAT;
use slmc_targets::bundle::{MANIFEST_FILE, SIGNATURE_FILE};
use slmc_targets::files::read_regular;

use super::serve::ServeArgs;

/// The page and its script, as `scripts/build-web` leaves them.
const PAGE_FILES: [(&str, &str); 2] =
    [("index.html", "text/html; charset=utf-8"), ("slmc-web.js", "text/javascript; charset=utf-8")];

struct WebState {
    root: PathBuf,
    bundle: PathBuf,
    /// Files the page may fetch from the bundle: the manifest's list, the manifest and its signature.
    listed: std::collections::BTreeSet<String>,
    config: Value,
}

/// Where the built page lives: `--web-root`, else $SLMC_WEB_DIR, else this source tree's build.
fn web_root(args: &ServeArgs) -> PathBuf {
    args.web_root
        .clone()
        .or_else(|| std::env::var_os("SLMC_WEB_DIR").map(PathBuf::from))
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../runtime/web/dist"))
}

pub(crate) fn serve_web(args: &ServeArgs) -> Result<()> {
    let bundle = args.common.model.clone().ok_or_else(|| anyhow!("serve --web needs a bundle directory"))?;
    let root = web_root(args);
    for (name, _) in PAGE_FILES {
        if !root.join(name).is_file() {
            bail!(
                "{}: the browser runtime is not built (run scripts/build-web, or point --web-root at its dist/)",
                root.join(name).display()
            );
        }
    }
    if !slmc_runtime::bundle::is_bundle(&bundle) {
        bail!(
            "{}: not a bundle (no manifest.json); serve --web serves signed or hashed bundles only",
            bundle.display()
        );
    }
    let trust = args.run.trust.trust()?;
    let verified = slmc_runtime::bundle::verify(&bundle, &trust)?;
    let artifact: Value = verified
        .files
        .bytes("artifact.json")
        .ok()
        .and_then(|b| serde_json::from_slice(b).ok())
        .ok_or_else(|| anyhow!("{}: no readable artifact.json", bundle.display()))?;
    if artifact["format"] != GPU_ARTIFACT_FORMAT {
        bail!(
            "{}: a {} artifact; the browser runs GPU (WGSL) bundles: compile with --target webgpu",
            bundle.join("artifact.json").display(),
            artifact["format"]
        );
    }
    let mut listed: std::collections::BTreeSet<String> =
        verified.manifest.files.iter().map(|f| f.path.clone()).collect();
    listed.extend([MANIFEST_FILE.to_string(), SIGNATURE_FILE.to_string()]);
    let config = json!({
        "bundle": "bundle/",
        "public_key": trust.public_key.map(|k| slmc_runtime::bundle::hex(k.as_bytes())),
        "allow_unsigned": trust.allow_unsigned,
    });
    let model = verified.manifest.model.name.clone();
    let state = Arc::new(WebState { root, bundle, listed, config });
    let app = Router::new()
        .route("/", get(|s: State<Arc<WebState>>| page_file(s, "index.html")))
        .route("/index.html", get(|s: State<Arc<WebState>>| page_file(s, "index.html")))
        .route("/slmc-web.js", get(|s: State<Arc<WebState>>| page_file(s, "slmc-web.js")))
        .route("/web-config.json", get(|State(s): State<Arc<WebState>>| async move { Json(s.config.clone()) }))
        .route("/health", get(|| async { Json(json!({"status": "ok"})) }))
        // Browsers ask for one; an empty answer keeps their consoles free of 404s.
        .route("/favicon.ico", get(|| async { StatusCode::NO_CONTENT }))
        .route("/bundle/{*path}", get(bundle_file))
        .fallback(|| async { (StatusCode::NOT_FOUND, "not found").into_response() })
        .with_state(state);
    super::serve::listen_and_serve(args, app, &format!("the browser page for model {model}"))
}

fn content_type(path: &str) -> &'static str {
    match path.rsplit('.').next() {
        Some("json") => "application/json",
        Some("wgsl" | "metal" | "slir" | "sig") => "text/plain; charset=utf-8",
        _ => "application/octet-stream",
    }
}

fn file_response(bytes: Vec<u8>, kind: &'static str) -> Response {
    ([(header::CONTENT_TYPE, kind), (header::CACHE_CONTROL, "no-store")], bytes).into_response()
}

async fn page_file(State(state): State<Arc<WebState>>, name: &'static str) -> Response {
    let kind = PAGE_FILES.iter().find(|(n, _)| *n == name).map_or("application/octet-stream", |(_, k)| k);
    match read_regular(&state.root, name, None) {
        Ok(bytes) => file_response(bytes, kind),
        Err((path, message)) => {
            (StatusCode::INTERNAL_SERVER_ERROR, format!("{}: {message}", path.display())).into_response()
        }
    }
}

/// A bundle file named in its manifest, read from disk now (symlinks and paths outside refused).
async fn bundle_file(State(state): State<Arc<WebState>>, UrlPath(path): UrlPath<String>) -> Response {
    if !state.listed.contains(&path) {
        return (StatusCode::NOT_FOUND, format!("{path}: not a file of this bundle")).into_response();
    }
    let dir = state.bundle.clone();
    let read = tokio::task::spawn_blocking(move || read_regular(&dir, &path, None).map(|b| (path, b))).await;
    match read {
        Ok(Ok((path, bytes))) => file_response(bytes, content_type(&path)),
        // The signature is optional: an unsigned bundle has none.
        Ok(Err((path, _))) if !path.exists() => (StatusCode::NOT_FOUND, "no such file").into_response(),
        Ok(Err((path, message))) => (StatusCode::FORBIDDEN, format!("{}: {message}", path.display())).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}
