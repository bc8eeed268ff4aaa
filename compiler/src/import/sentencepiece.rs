//! GGUF `tokenizer.ggml.model = llama` vocabularies (SentencePiece BPE with byte fallback)
//! for Gemma, rebuilt as a `tokenizers` BPE the way transformers 5 converts them, so ids
//! equal transformers' (`../shared/golden/gemma3-tokenizer.json`):
//!
//! * all-whitespace tokens containing a space are respelled with `▁` (llama.cpp writes
//!   them with spaces);
//! * merges are every split of every token into two vocabulary pieces, ranked by the
//!   token's id, longer left piece first (the GGUF scores are not used: llama.cpp gives
//!   added pieces a score of -1000, so the order of the vocabulary is the reliable rank);
//! * spaces become `▁` (no prefix space), control tokens are special added tokens, and
//!   user-defined tokens whose spelling is in the vocabulary are added tokens matched whole;
//! * BOS is prepended when `tokenizer.ggml.add_bos_token` says so.

use std::collections::BTreeMap;

use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::normalizers::replace::Replace;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

use super::gguf::Value;
use super::tokenizer::{add_bos_if_asked, TOKEN_TYPE_CONTROL, TOKEN_TYPE_USER_DEFINED};

/// The names transformers' Gemma tokenizer always registers as special.
const NAMED_SPECIAL: [&str; 5] = ["<unk>", "<bos>", "<eos>", "<pad>", "<mask>"];

pub fn build_gemma(md: &BTreeMap<String, Value>) -> Result<Tokenizer, String> {
    let array = |key: &str| md.get(key).and_then(|v| v.as_array()).ok_or_else(|| format!("the GGUF has no {key}"));
    let tokens: Vec<&str> = array("tokenizer.ggml.tokens")?
        .iter()
        .map(|v| v.as_str().ok_or("tokenizer.ggml.tokens holds a non-string"))
        .collect::<Result<_, _>>()?;
    let types: Vec<i64> =
        array("tokenizer.ggml.token_type")?.iter().map(|t| t.as_f64().unwrap_or(1.0) as i64).collect();
    if types.len() != tokens.len() {
        return Err(format!("{} token types for {} tokens", types.len(), tokens.len()));
    }
    let respelled: Vec<String> =
        tokens
            .iter()
            .map(|t| {
                if t.contains(' ') && t.trim().is_empty() {
                    "\u{2581}".repeat(t.chars().count())
                } else {
                    t.to_string()
                }
            })
            .collect();
    // A duplicated spelling keeps its last id, as a Python dict built in order does.
    let vocab: Vocab = respelled.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect();
    let merges = merges_by_token_order(&respelled, &vocab);
    let bpe = BPE::builder()
        .vocab_and_merges(vocab.clone(), merges)
        .unk_token("<unk>".into())
        .fuse_unk(true)
        .byte_fallback(true)
        .build()
        .map_err(|e| format!("cannot build the SentencePiece BPE: {e}"))?;
    let mut tokenizer = Tokenizer::new(bpe);
    let spaces = Replace::new(" ", "\u{2581}").map_err(|e| e.to_string())?;
    tokenizer.with_normalizer(Some(spaces)).map_err(|e| format!("cannot set the normalizer: {e}"))?;
    // A no-op after the normalizer (no spaces are left), kept so the tokenizer.json
    // written into bundles reads like transformers' own.
    let split = Split::new(SplitPattern::String(" ".into()), SplitDelimiterBehavior::MergedWithPrevious, false)
        .map_err(|e| e.to_string())?;
    tokenizer.with_pre_tokenizer(Some(split));
    tokenizer.with_decoder(Some(DecoderSequence::new(vec![
        Replace::new("\u{2581}", " ").map_err(|e| e.to_string())?.into(),
        ByteFallback::new().into(),
        Fuse::new().into(),
    ])));
    let mut special: Vec<AddedToken> = tokens
        .iter()
        .zip(&types)
        .filter(|(t, ty)| **ty == TOKEN_TYPE_CONTROL || NAMED_SPECIAL.contains(t))
        .map(|(t, _)| AddedToken::from(t.to_string(), true).normalized(false))
        .collect();
    special.dedup_by(|a, b| a.content == b.content);
    tokenizer.add_special_tokens(special).map_err(|e| format!("cannot add special tokens: {e}"))?;
    let user: Vec<AddedToken> = tokens
        .iter()
        .zip(&types)
        .filter(|(t, ty)| **ty == TOKEN_TYPE_USER_DEFINED && vocab.contains_key(**t))
        .map(|(t, _)| AddedToken::from(t.to_string(), false).normalized(false))
        .collect();
    tokenizer.add_tokens(user).map_err(|e| format!("cannot add user-defined tokens: {e}"))?;
    add_bos_if_asked(&mut tokenizer, md, &tokens, true)?;
    Ok(tokenizer)
}

/// Every split of every token into two vocabulary pieces, ranked by the token's id and then
/// by the left piece's length (longest first). A spelling that occurs twice ranks by the id
/// it keeps (its last).
fn merges_by_token_order(tokens: &[String], vocab: &Vocab) -> Vec<(String, String)> {
    let mut merges = Vec::new();
    for (id, token) in tokens.iter().enumerate() {
        if vocab.get(token) != Some(&(id as u32)) {
            continue;
        }
        let bounds: Vec<usize> = token.char_indices().map(|(i, _)| i).skip(1).collect();
        for &at in bounds.iter().rev() {
            let (l, r) = token.split_at(at);
            if vocab.contains_key(l) && vocab.contains_key(r) {
                merges.push((l.to_string(), r.to_string()));
            }
        }
    }
    merges
}
