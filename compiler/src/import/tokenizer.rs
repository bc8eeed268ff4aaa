//! Tokenizers: the one embedded in GGUF metadata (`tokenizer.ggml.*`, GPT-2 style
//! byte-level BPE), rebuilt as a `tokenizers::Tokenizer` so both formats share one
//! implementation; and chat templates rendered with minijinja.

use std::collections::BTreeMap;

use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, Tokenizer};

use super::gguf::Value;

/// GGUF token types (llama.cpp's `llama_token_type`).
pub(super) const TOKEN_TYPE_CONTROL: i64 = 3;
pub(super) const TOKEN_TYPE_USER_DEFINED: i64 = 4;

type TokenizerParts = (Result<Tokenizer, String>, Option<String>, Option<String>, Option<String>);

/// Builds the tokenizer, chat template, BOS and EOS text from GGUF metadata. A model
/// without a usable tokenizer still imports; the reason is kept for commands that need text.
pub fn from_gguf(md: &BTreeMap<String, Value>) -> TokenizerParts {
    let template = md.get("tokenizer.chat_template").and_then(|v| v.as_str()).map(str::to_string);
    let tokens: Vec<&str> = md
        .get("tokenizer.ggml.tokens")
        .and_then(|v| v.as_array())
        .map(|a| a.iter().filter_map(|t| t.as_str()).collect())
        .unwrap_or_default();
    let special =
        |key: &str| md.get(key).and_then(|v| v.as_u64()).and_then(|id| tokens.get(id as usize)).map(|s| s.to_string());
    let (bos, eos) = (special("tokenizer.ggml.bos_token_id"), special("tokenizer.ggml.eos_token_id"));
    (build(md), template, bos, eos)
}

fn build(md: &BTreeMap<String, Value>) -> Result<Tokenizer, String> {
    let model =
        md.get("tokenizer.ggml.model").and_then(|v| v.as_str()).ok_or("the GGUF has no tokenizer.ggml.model")?;
    let arch = md.get("general.architecture").and_then(|v| v.as_str()).unwrap_or_default();
    match model {
        "gpt2" => {}
        "llama" if arch.starts_with("gemma") => return super::sentencepiece::build_gemma(md),
        "llama" => {
            return Err(format!(
                "GGUF tokenizer model `llama` (SentencePiece) is supported for Gemma architectures only, not `{arch}`"
            ))
        }
        other => return Err(format!("GGUF tokenizer model `{other}` is not supported (gpt2, llama for Gemma)")),
    }
    let pre = md.get("tokenizer.ggml.pre").and_then(|v| v.as_str()).unwrap_or("default");
    // llama.cpp's `smollm` pre-tokenizer splits every digit on its own before the GPT-2
    // regex; `gpt2`/`default` is the plain GPT-2 regex.
    let split_digits = match pre {
        "smollm" => true,
        "gpt2" | "default" => false,
        other => return Err(format!("GGUF pre-tokenizer `{other}` is not supported (smollm, gpt2)")),
    };
    let strings = |key: &str| -> Result<Vec<String>, String> {
        md.get(key)
            .and_then(|v| v.as_array())
            .ok_or_else(|| format!("the GGUF has no {key}"))?
            .iter()
            .map(|v| v.as_str().map(str::to_string).ok_or_else(|| format!("{key} holds a non-string")))
            .collect()
    };
    let tokens = strings("tokenizer.ggml.tokens")?;
    let merges: Vec<(String, String)> = strings("tokenizer.ggml.merges")?
        .into_iter()
        .map(|m| {
            m.split_once(' ').map(|(a, b)| (a.to_string(), b.to_string())).ok_or_else(|| format!("bad merge `{m}`"))
        })
        .collect::<Result<_, _>>()?;
    let types: Vec<i64> = md
        .get("tokenizer.ggml.token_type")
        .and_then(|v| v.as_array())
        .map(|a| a.iter().map(|t| t.as_f64().unwrap_or(1.0) as i64).collect())
        .unwrap_or_default();
    let vocab: tokenizers::models::bpe::Vocab = tokens.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect();
    let bpe = BPE::builder().vocab_and_merges(vocab, merges).build().map_err(|e| format!("cannot build BPE: {e}"))?;
    let mut tokenizer = Tokenizer::new(bpe);
    let byte_level = ByteLevel::new(false, true, true);
    let pre_tokenizer: PreTokenizerWrapper = if split_digits {
        Sequence::new(vec![Digits::new(true).into(), byte_level.into()]).into()
    } else {
        byte_level.into()
    };
    tokenizer.with_pre_tokenizer(Some(pre_tokenizer));
    tokenizer.with_decoder(Some(ByteLevelDecoder::default()));
    let added: Vec<AddedToken> = tokens
        .iter()
        .zip(types.iter())
        .filter(|(_, t)| **t == TOKEN_TYPE_CONTROL || **t == TOKEN_TYPE_USER_DEFINED)
        .map(|(tok, ty)| AddedToken::from(tok.clone(), *ty == TOKEN_TYPE_CONTROL).normalized(false))
        .collect();
    tokenizer.add_special_tokens(added).map_err(|e| format!("cannot add special tokens: {e}"))?;
    add_bos_if_asked(&mut tokenizer, md, &tokens, false)?;
    Ok(tokenizer)
}

/// Prepends BOS to every encoding when `tokenizer.ggml.add_bos_token` says so (`default`
/// when the key is absent: false for GPT-2 vocabularies, true for SentencePiece ones).
pub(super) fn add_bos_if_asked<S: AsRef<str>>(
    tokenizer: &mut Tokenizer,
    md: &BTreeMap<String, Value>,
    tokens: &[S],
    default: bool,
) -> Result<(), String> {
    if !md.get("tokenizer.ggml.add_bos_token").and_then(|v| v.as_bool()).unwrap_or(default) {
        return Ok(());
    }
    let bos_id =
        md.get("tokenizer.ggml.bos_token_id").and_then(|v| v.as_u64()).ok_or("add_bos_token without bos_token_id")?;
    let bos = tokens.get(bos_id as usize).ok_or("bos_token_id outside the vocabulary")?.as_ref();
    let processor = TemplateProcessing::builder()
        .try_single(format!("{bos} $A"))
        .and_then(|b| b.try_pair(format!("{bos} $A {bos} $B")))
        .map_err(|e| format!("bad BOS template: {e}"))?
        .special_tokens(vec![(bos.to_string(), bos_id as u32)])
        .build()
        .map_err(|e| format!("bad BOS template: {e}"))?;
    tokenizer.with_post_processor(Some(processor));
    Ok(())
}

/// Gemma's turn format, for Gemma checkpoints that carry no chat template (the base
/// models): `<start_of_turn>user ... <end_of_turn>`, assistant turns as `model`, a system
/// message folded into the first user turn followed by a blank line (as Gemma's own
/// template does, content trimmed).
pub const GEMMA_TURN_TEMPLATE: &str = "{{ bos_token }}\
{%- if messages[0]['role'] == 'system' -%}\
{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}\
{%- set loop_messages = messages[1:] -%}\
{%- else -%}\
{%- set first_user_prefix = '' -%}\
{%- set loop_messages = messages -%}\
{%- endif -%}\
{%- for message in loop_messages -%}\
{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}\
{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') + (message['content'] | trim) + '<end_of_turn>\n' }}\
{%- endfor -%}\
{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}";

/// One chat message.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

/// The work one chat template rendering may do (minijinja fuel units).
pub const CHAT_TEMPLATE_FUEL: u64 = 10_000_000;

/// A `tokenizer.json` as slmc uses it: padding and truncation off (generation never pads,
/// and a file's `padding: {"Fixed": huge}` would size an allocation); `shown` names the file
/// in errors.
pub fn tokenizer_from_json(bytes: &[u8], shown: &std::path::Path) -> Result<Tokenizer, String> {
    // The tokenizers crate panics (an `expect`) on JSON that is malformed inside its
    // untagged sections (found by fuzzing: a syntax error, an invalid \u escape): parse
    // the text completely first and build the tokenizer from the parsed value.
    let value: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| format!("{}: not valid JSON: {e}", shown.display()))?;
    check_template_processing(&value).map_err(|m| format!("{}: post_processor: {m}", shown.display()))?;
    let mut tokenizer: Tokenizer = serde_json::from_value(value).map_err(|e| format!("{}: {e}", shown.display()))?;
    tokenizer.with_padding(None);
    tokenizer.with_truncation(None).map_err(|e| format!("{}: {e}", shown.display()))?;
    Ok(tokenizer)
}

/// The invariants the tokenizers crate's `TemplateProcessing` assumes but does not check when
/// it is deserialized (it indexes them while encoding; found by fuzzing): every special token
/// a template names is defined, with as many ids as tokens, and the single-sequence template
/// names only sequence A.
fn check_template_processing(value: &serde_json::Value) -> Result<(), String> {
    use serde_json::Value;
    match value {
        // Recognised by its fields, not its `type`: the crate's untagged fallback takes an
        // object of this shape whatever its type says (found by fuzzing).
        Value::Object(map) if ["single", "pair", "special_tokens"].iter().any(|k| map.contains_key(*k)) => {
            let specials = map.get("special_tokens").and_then(Value::as_object);
            for (which, template) in [("single", map.get("single")), ("pair", map.get("pair"))] {
                for piece in template.and_then(Value::as_array).into_iter().flatten() {
                    if let Some(id) = piece.pointer("/SpecialToken/id").and_then(Value::as_str) {
                        let token = specials.and_then(|s| s.get(id)).ok_or_else(|| {
                            format!("the {which} template names the special token `{id}`, which is not defined")
                        })?;
                        let len = |k: &str| token.get(k).and_then(Value::as_array).map(Vec::len);
                        if len("ids") != len("tokens") {
                            return Err(format!(
                                "special token `{id}` has {:?} ids for {:?} tokens",
                                len("ids"),
                                len("tokens")
                            ));
                        }
                    }
                    if which == "single" && piece.pointer("/Sequence/id").and_then(Value::as_str) == Some("B") {
                        return Err("the single template names sequence B".into());
                    }
                }
            }
            Ok(())
        }
        Value::Object(map) => map.values().try_for_each(check_template_processing),
        Value::Array(items) => items.iter().try_for_each(check_template_processing),
        _ => Ok(()),
    }
}

/// Renders a Hugging Face chat template (Jinja) as transformers'
/// `apply_chat_template(messages, add_generation_prompt=True, tokenize=False)` does.
pub fn render_chat(
    template: &str,
    messages: &[Message],
    bos_token: Option<&str>,
    eos_token: Option<&str>,
) -> Result<String, String> {
    let mut env = minijinja::Environment::new();
    // transformers renders with trim_blocks and lstrip_blocks on.
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    // A template comes with the checkpoint or bundle: bound its work (a real chat template
    // spends a few thousand units on a long conversation) so a hostile one cannot loop for
    // ever.
    env.set_fuel(Some(CHAT_TEMPLATE_FUEL));
    env.set_recursion_limit(64);
    env.add_function("raise_exception", |msg: String| -> Result<String, minijinja::Error> {
        Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, msg))
    });
    env.add_template("chat", template).map_err(|e| format!("bad chat template: {e}"))?;
    let tmpl = env.get_template("chat").map_err(|e| e.to_string())?;
    tmpl.render(minijinja::context! {
        messages => messages,
        add_generation_prompt => true,
        bos_token => bos_token.unwrap_or(""),
        eos_token => eos_token.unwrap_or(""),
    })
    .map_err(|e| format!("chat template failed: {e}"))
}
