//! Running models and compiled artifacts: `slmc run`, and the artifact loading and
//! text side (tokenizer, end tokens) `run`, `score` and `eval` share.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{anyhow, bail, Result};
use serde_json::{json, Value};
use slmc_compiler::import::tokenizer::{render_chat, Message};
use slmc_compiler::import::Model;
use slmc_ir::Layered;
use slmc_runtime::files::ArtifactFiles;
use slmc_runtime::{generate, GenerateOptions, InterpreterExecutor};

use crate::*;

/// Text handling of whatever is being run: a model's tokenizer and chat template, or the
/// copies an artifact carries.
pub(crate) struct TextSide {
    pub(crate) origin: PathBuf,
    pub(crate) tokenizer: Result<tokenizers::Tokenizer, String>,
    pub(crate) chat_template: Option<String>,
    pub(crate) bos_token: Option<String>,
    pub(crate) eos_token: Option<String>,
    pub(crate) eos_ids: Vec<u32>,
}

impl TextSide {
    pub(crate) fn of_model(model: &Model) -> TextSide {
        TextSide {
            origin: model.path.clone(),
            tokenizer: model.tokenizer.clone(),
            chat_template: model.chat_template.clone(),
            bos_token: model.bos_token.clone(),
            eos_token: model.eos_token.clone(),
            eos_ids: model.config.eos_token_ids.clone(),
        }
    }

    /// The text side an artifact carries, from its checked bytes.
    pub(crate) fn of_artifact(files: &ArtifactFiles, eos_ids: Vec<u32>) -> Result<TextSide> {
        let dir = files.dir();
        let tokenizer = match files.get("tokenizer.json") {
            Some(bytes) => slmc_compiler::import::tokenizer::tokenizer_from_json(bytes, &files.path("tokenizer.json")),
            None => Err(format!("{} has no tokenizer.json", dir.display())),
        };
        let text = |name: &str| {
            files.get(name).map(|_| files.text(name)).transpose().map_err(|(p, m)| anyhow!("{}: {m}", p.display()))
        };
        let jinja = text("chat_template.jinja")?.map(str::to_string);
        let (chat_template, bos_token, eos_token) =
            slmc_compiler::import::hf::parse_tokenizer_config(dir, text("tokenizer_config.json")?, jinja)?;
        Ok(TextSide { origin: dir.to_path_buf(), tokenizer, chat_template, bos_token, eos_token, eos_ids })
    }

    pub(crate) fn prompt_ids(&self, prompt: &PromptArgs) -> Result<Vec<u32>> {
        match (&prompt.prompt, &prompt.prompt_ids) {
            (Some(text), _) => {
                let (text, special) = if prompt.chat {
                    let template = self
                        .chat_template
                        .as_deref()
                        .ok_or_else(|| anyhow!("{}: the model has no chat template", self.origin.display()))?;
                    let messages = [Message { role: "user".into(), content: text.clone() }];
                    let rendered =
                        render_chat(template, &messages, self.bos_token.as_deref(), self.eos_token.as_deref())
                            .map_err(|e| anyhow!(e))?;
                    (rendered, false)
                } else {
                    (text.clone(), true)
                };
                let tok = self.tokenizer.as_ref().map_err(|e| anyhow!("{e}"))?;
                Ok(tok
                    .encode(text.as_str(), special)
                    .map_err(|e| anyhow!("tokenizing the prompt: {e}"))?
                    .get_ids()
                    .to_vec())
            }
            (None, Some(ids)) => Ok(ids.clone()),
            (None, None) => bail!("give --prompt TEXT or --prompt-ids IDS"),
        }
    }
}

/// A compiled artifact given as MODEL (`artifact.json`), opened by the runtime's registry
/// from the bytes verification checked.
pub(crate) struct LoadedArtifact {
    pub(crate) exec: Box<dyn slmc_runtime::Executor>,
    /// The executor's name for `--json`.
    pub(crate) name: &'static str,
    pub(crate) side: TextSide,
    /// The bundle as verified (None for a bare artifact).
    pub(crate) bundle: Option<slmc_runtime::bundle::Verified>,
}

pub(crate) fn artifact_executor(common: &Common, exec: &RunArgs, opt: &OptArgs) -> Result<Option<LoadedArtifact>> {
    let Some(path) = common.model.as_ref().filter(|p| p.join("artifact.json").is_file()) else {
        return Ok(None);
    };
    if opt.request().is_active() {
        bail!("{}: optimizer flags apply when compiling; this is a compiled artifact", path.display());
    }
    let trust = exec.trust.trust()?;
    let (files, bundle) = if slmc_runtime::bundle::is_bundle(path) {
        let verified = slmc_runtime::bundle::verify(path, &trust)?;
        (verified.files.clone(), Some(verified))
    } else if trust.allow_unsigned {
        let files = ArtifactFiles::read_bare(path).map_err(|(p, m)| anyhow!("{}: {m}", p.display()))?;
        (files, None)
    } else {
        bail!(
            "{}: not a bundle (no manifest.json): refusing it (pass --allow-unsigned to run a bare artifact)",
            path.display()
        );
    };
    let opened = slmc_runtime::registry::open_files(&files, &exec.open_options())?;
    if common.verbose {
        eprintln!("{}", opened.detail);
    }
    let side = TextSide::of_artifact(&files, opened.eos_token_ids)?;
    Ok(Some(LoadedArtifact { exec: opened.exec, name: opened.executor_name, side, bundle }))
}

/// What `run` answers instead of a low-confidence answer (`--abstain-below`).
pub(crate) const ABSTENTION_TEXT: &str = "I can't answer that with enough confidence.";

/// The exit status of an abstention.
pub(crate) const ABSTAINED_EXIT: u8 = 3;

/// `run` abstained: the abstention is printed, the process exits with `ABSTAINED_EXIT`.
#[derive(Debug, thiserror::Error)]
#[error("abstained: confidence {confidence:.4} is below {threshold}")]
pub(crate) struct Abstained {
    confidence: f64,
    threshold: f64,
}

pub(crate) fn run(
    common: &Common,
    exec: &RunArgs,
    prompt: &PromptArgs,
    generation: &GenerationArgs,
    opt: &OptArgs,
) -> Result<()> {
    if let Some(LoadedArtifact { mut exec, name, side, .. }) = artifact_executor(common, exec, opt)? {
        let prompt_ids = side.prompt_ids(prompt)?;
        return generate_and_print(common, exec.as_mut(), name, &side, &prompt_ids, generation);
    }
    let model = load(common)?;
    let side = TextSide::of_model(&model);
    let prompt_ids = side.prompt_ids(prompt)?;
    let prepared = prepare(&model, opt, false)?;
    let weights = Layered { top: &prepared.derived, base: &model.weights };
    let mut exec = InterpreterExecutor::new(&prepared.graph, &weights, model.config.max_position_embeddings)?;
    generate_and_print(common, &mut exec, "interpreter", &side, &prompt_ids, generation)
}

pub(crate) fn generate_and_print(
    common: &Common,
    exec: &mut dyn slmc_runtime::Executor,
    executor: &str,
    side: &TextSide,
    prompt_ids: &[u32],
    generation: &GenerationArgs,
) -> Result<()> {
    let opts = GenerateOptions {
        max_new_tokens: generation.max_new_tokens,
        stop_ids: if generation.ignore_eos { vec![] } else { side.eos_ids.clone() },
        record_steps: generation.record_logits,
        record_top_k: generation.record_top_k,
        // Scores need every step's logits: asked for by JSON and by a threshold.
        confidence: common.json || generation.abstain_below.is_some(),
        sampling: None,
    };
    let tok = side.tokenizer.as_ref().ok();
    let mut streamed = String::new();
    let mut so_far = Vec::new();
    // An answer that may be withheld is shown only once its confidence is known.
    let stream = !common.json && tok.is_some() && generation.abstain_below.is_none();
    let gen = generate(exec, prompt_ids, &opts, |id| {
        if !stream {
            return;
        }
        so_far.push(id);
        // People read the stream: special tokens such as <|im_end|> are left out.
        if let Ok(text) = tok.expect("stream implies a tokenizer").decode(&so_far, true) {
            // Hold back a partial UTF-8 sequence until its last byte arrives.
            if text.len() > streamed.len() && !text.ends_with('\u{FFFD}') && text.starts_with(streamed.as_str()) {
                print!("{}", &text[streamed.len()..]);
                let _ = std::io::stdout().flush();
                streamed = text;
            }
        }
    })?;
    let text = match tok {
        Some(t) => t.decode(&gen.generated, false).map_err(|e| anyhow!("decoding: {e}"))?,
        None => String::new(),
    };
    let ttft = gen.prefill_seconds;
    let confidence = gen.confidence();
    let abstained = match (generation.abstain_below, confidence) {
        (Some(threshold), Some(c)) if c < threshold => Some(Abstained { confidence: c, threshold }),
        _ => None,
    };
    if common.json {
        let recorded: Vec<Value> = gen
            .recorded
            .iter()
            .map(|r| json!({ "top": r.top.iter().map(|(id, l)| json!({ "id": id, "logit": l })).collect::<Vec<_>>(), "logsumexp": r.logsumexp }))
            .collect();
        print_json(&json!({
            "prompt_ids": prompt_ids,
            "generated_ids": gen.generated,
            "text": text,
            "decode_tokens_per_s": gen.decode_tokens_per_s(),
            "prefill_tokens_per_s": prompt_ids.len() as f64 / ttft.max(1e-9),
            "time_to_first_token_s": ttft,
            "executor": executor,
            "recorded_logits": recorded,
            "token_logprobs": gen.token_logprobs,
            "token_entropies": gen.token_entropies,
            "confidence": confidence,
            "abstained": abstained.is_some(),
            "abstention": abstained.as_ref().map(|_| ABSTENTION_TEXT),
        }));
    } else {
        if abstained.is_some() {
            println!("{ABSTENTION_TEXT}");
        } else if !stream && generation.abstain_below.is_some() && tok.is_some() {
            let shown = tok.expect("checked").decode(&gen.generated, true).map_err(|e| anyhow!("decoding: {e}"))?;
            println!("{shown}");
        } else if !stream {
            println!("{:?}", gen.generated);
        } else {
            // Whatever the stream held back (a trailing partial character) goes out now.
            let shown = tok.expect("stream implies a tokenizer").decode(&gen.generated, true).unwrap_or_default();
            if let Some(rest) = shown.strip_prefix(streamed.as_str()) {
                print!("{rest}");
            }
            println!();
        }
        eprintln!(
            "[{} prompt tokens, {} generated; prefill {:.1} tok/s, decode {:.1} tok/s]",
            prompt_ids.len(),
            gen.generated.len(),
            prompt_ids.len() as f64 / ttft.max(1e-9),
            gen.decode_tokens_per_s()
        );
        if let Some(c) = confidence {
            eprintln!("[confidence {c:.4}]");
        }
    }
    match abstained {
        Some(a) => Err(a.into()),
        None => Ok(()),
    }
}
