//! Eval sets (`compile --eval-set FILE`, JSON Lines): the team's questions with accepted
//! answers, or that must be declined, rendered with the model's chat template and tokenized
//! at compile time, stored in the bundle (`eval_set.json`, covered by the manifest and its
//! signature), run by `slmc eval` on the device's executor, and gated on by `compile` (the
//! bundle's accuracy against the unquantized model's on the interpreter).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use serde::{Deserialize, Serialize};
use slmc_runtime::{generate, ExecError, Executor, GenerateOptions};
use tokenizers::Tokenizer;

use crate::import::tokenizer::{render_chat, Message};

pub const EVAL_SET_FILE: &str = "eval_set.json";
pub const EVAL_SET_SCHEMA: &str = "slmc-eval-set-1";
pub const DEFAULT_MAX_NEW_TOKENS: usize = 40;
/// The most tokens an item may ask for (a bound on the work a file can ask for).
pub const MAX_NEW_TOKENS_LIMIT: usize = 4096;
/// Phrases that count as declining (case-insensitive), unless `--refusal` names others.
pub const DEFAULT_REFUSALS: &[&str] = &["I can't", "I cannot", "I don't know", "I do not know", "not able to"];

#[derive(Debug, thiserror::Error)]
pub enum EvalSetError {
    #[error("{file}:{line}: {message}")]
    Line { file: String, line: usize, message: String },
    #[error("{file}: {message}")]
    File { file: String, message: String },
}

/// What counts as a right answer: any one entry matching passes the item.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "lowercase", deny_unknown_fields)]
pub enum Accept {
    /// The answer contains the text (case-insensitive): a citation such as "Section 6".
    Contains(String),
    /// The regular expression matches somewhere in the answer (`(?i)` for case-insensitive).
    Regex(String),
    /// The answer, trimmed, is exactly the text.
    Exact(String),
}

/// An item as stored in the bundle: its prompt already rendered and tokenized.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct EvalItem {
    pub id: String,
    pub prompt_ids: Vec<u32>,
    #[serde(default)]
    pub accept: Vec<Accept>,
    #[serde(default)]
    pub abstain: bool,
    pub max_new_tokens: usize,
    #[serde(default)]
    pub tags: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct EvalSet {
    pub schema: String,
    /// Answers whose confidence is below this are abstentions (None: never).
    pub abstain_below: Option<f64>,
    pub refusals: Vec<String>,
    pub items: Vec<EvalItem>,
}

/// One line of the input file.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Line {
    id: String,
    messages: Option<Vec<Message>>,
    prompt: Option<String>,
    accept: Option<Vec<Accept>>,
    abstain: Option<bool>,
    max_new_tokens: Option<usize>,
    #[serde(default)]
    tags: Vec<String>,
}

/// How prompts become tokens: the model's tokenizer and chat template.
pub struct Renderer<'a> {
    pub tokenizer: &'a Tokenizer,
    pub chat_template: Option<&'a str>,
    pub bos_token: Option<&'a str>,
    pub eos_token: Option<&'a str>,
}

impl Renderer<'_> {
    /// Text tokenized as it is (no template, no special tokens added).
    pub fn plain_ids(&self, text: &str) -> Result<Vec<u32>, String> {
        let ids = self.tokenizer.encode(text, false).map_err(|e| format!("tokenizing: {e}"))?.get_ids().to_vec();
        if ids.is_empty() {
            return Err("the sample tokenizes to no tokens".into());
        }
        Ok(ids)
    }

    /// Messages rendered with the chat template (or their text joined when there is none).
    pub fn ids(&self, messages: &[Message]) -> Result<Vec<u32>, String> {
        let (text, special) = match self.chat_template {
            Some(t) => (render_chat(t, messages, self.bos_token, self.eos_token)?, false),
            // No template: the messages' text as it is, with the tokenizer's own specials.
            None => (messages.iter().map(|m| m.content.as_str()).collect::<Vec<_>>().join("\n"), true),
        };
        let ids =
            self.tokenizer.encode(text.as_str(), special).map_err(|e| format!("tokenizing: {e}"))?.get_ids().to_vec();
        if ids.is_empty() {
            return Err("the prompt renders to no tokens".into());
        }
        Ok(ids)
    }
}

/// Parses and checks an eval set file and renders every prompt.
pub fn parse(
    path: &Path,
    text: &str,
    renderer: &Renderer,
    abstain_below: Option<f64>,
    refusals: Vec<String>,
) -> Result<EvalSet, EvalSetError> {
    let file = path.display().to_string();
    let err = |line: usize, message: String| EvalSetError::Line { file: file.clone(), line, message };
    let mut items = Vec::new();
    let mut ids = BTreeSet::new();
    for (i, raw) in text.lines().enumerate() {
        let n = i + 1;
        if raw.trim().is_empty() {
            continue;
        }
        let line: Line = serde_json::from_str(raw).map_err(|e| err(n, format!("not an eval item: {e}")))?;
        if line.id.trim().is_empty() || !ids.insert(line.id.clone()) {
            return Err(err(n, format!("item ids must be non-empty and unique (`{}`)", line.id)));
        }
        let abstain = line.abstain.unwrap_or(false);
        let accept = line.accept.unwrap_or_default();
        match (abstain, accept.is_empty()) {
            (true, false) => return Err(err(n, "an item has either `accept` or `\"abstain\": true`, not both".into())),
            (false, true) => {
                return Err(err(n, "an item needs `accept` (a non-empty list) or `\"abstain\": true`".into()))
            }
            _ => {}
        }
        for a in &accept {
            match a {
                Accept::Regex(r) => {
                    regex::Regex::new(r).map_err(|e| err(n, format!("regex `{r}`: {e}")))?;
                }
                Accept::Contains(t) | Accept::Exact(t) if t.trim().is_empty() => {
                    return Err(err(n, "an accepted answer is empty".into()))
                }
                _ => {}
            }
        }
        let messages = match (line.messages, line.prompt) {
            (Some(m), None) if !m.is_empty() => m,
            (None, Some(p)) => vec![Message { role: "user".into(), content: p }],
            _ => return Err(err(n, "an item has either `messages` (non-empty) or `prompt`".into())),
        };
        if let Some(m) = messages.iter().find(|m| !["system", "user", "assistant"].contains(&m.role.as_str())) {
            return Err(err(n, format!("unknown role `{}` (system, user, assistant)", m.role)));
        }
        let max_new_tokens = line.max_new_tokens.unwrap_or(DEFAULT_MAX_NEW_TOKENS);
        if max_new_tokens == 0 || max_new_tokens > MAX_NEW_TOKENS_LIMIT {
            return Err(err(n, format!("max_new_tokens must be 1 to {MAX_NEW_TOKENS_LIMIT}")));
        }
        let prompt_ids = renderer.ids(&messages).map_err(|e| err(n, e))?;
        items.push(EvalItem { id: line.id, prompt_ids, accept, abstain, max_new_tokens, tags: line.tags });
    }
    if items.is_empty() {
        return Err(EvalSetError::File { file, message: "the eval set has no items".into() });
    }
    Ok(EvalSet { schema: EVAL_SET_SCHEMA.into(), abstain_below, refusals, items })
}

/// One item's result.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ItemOutcome {
    pub id: String,
    pub passed: bool,
    pub answer: String,
    pub confidence: Option<f64>,
    pub abstained: bool,
    pub tags: Vec<String>,
}

/// Whether `answer` passes `item`.
pub fn judge(set: &EvalSet, item: &EvalItem, answer: &str, abstained: bool) -> bool {
    let lower = answer.to_lowercase();
    if item.abstain {
        return abstained || set.refusals.iter().any(|r| lower.contains(&r.to_lowercase()));
    }
    !abstained
        && item.accept.iter().any(|a| match a {
            Accept::Contains(t) => lower.contains(&t.to_lowercase()),
            Accept::Regex(r) => regex::Regex::new(r).is_ok_and(|re| re.is_match(answer)),
            Accept::Exact(t) => answer.trim() == t.trim(),
        })
}

/// Runs every item greedily on `exec` (end tokens stop an answer) and judges it.
pub fn run(
    exec: &mut dyn Executor,
    set: &EvalSet,
    tokenizer: &Tokenizer,
    eos_ids: &[u32],
) -> Result<Vec<ItemOutcome>, ExecError> {
    let mut out = Vec::new();
    for item in &set.items {
        let opts = GenerateOptions {
            max_new_tokens: item.max_new_tokens,
            stop_ids: eos_ids.to_vec(),
            confidence: true,
            ..Default::default()
        };
        let gen = generate(exec, &item.prompt_ids, &opts, |_| {})?;
        let answer = tokenizer.decode(&gen.generated, true).unwrap_or_default();
        let confidence = gen.confidence();
        let abstained = matches!((set.abstain_below, confidence), (Some(t), Some(c)) if c < t);
        let passed = judge(set, item, &answer, abstained);
        out.push(ItemOutcome { id: item.id.clone(), passed, answer, confidence, abstained, tags: item.tags.clone() });
    }
    Ok(out)
}

/// Passed, total and accuracy (percent) in all and per tag.
pub fn totals(outcomes: &[ItemOutcome]) -> serde_json::Value {
    let figures = |o: &[&ItemOutcome]| {
        let passed = o.iter().filter(|x| x.passed).count();
        serde_json::json!({ "passed": passed, "total": o.len(), "accuracy": accuracy_of(passed, o.len()) })
    };
    let mut by_tag: BTreeMap<&str, Vec<&ItemOutcome>> = BTreeMap::new();
    for o in outcomes {
        for t in &o.tags {
            by_tag.entry(t).or_default().push(o);
        }
    }
    let mut v = figures(&outcomes.iter().collect::<Vec<_>>());
    v["by_tag"] = by_tag.iter().map(|(t, o)| (t.to_string(), figures(o))).collect::<serde_json::Map<_, _>>().into();
    v
}

/// Accuracy in percent.
pub fn accuracy(outcomes: &[ItemOutcome]) -> f64 {
    accuracy_of(outcomes.iter().filter(|o| o.passed).count(), outcomes.len())
}

fn accuracy_of(passed: usize, total: usize) -> f64 {
    100.0 * passed as f64 / total.max(1) as f64
}

/// Items that pass on `base` and fail on `candidate`.
pub fn regressions(base: &[ItemOutcome], candidate: &[ItemOutcome]) -> Vec<String> {
    base.iter().zip(candidate).filter(|(b, c)| b.passed && !c.passed).map(|(b, _)| b.id.clone()).collect()
}

/// The abstention threshold that best separates right from wrong answers: answers at or
/// above it are given, below it withheld, and the threshold maximises right answers given
/// plus wrong answers withheld (a must-decline item is right when the model declined).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Calibration {
    pub threshold: f64,
    pub right_answered: usize,
    pub wrong_withheld: usize,
    pub wrong_answered: usize,
    pub right_withheld: usize,
    /// Right answers given plus wrong ones withheld, at the threshold and never abstaining.
    pub separated: usize,
    pub separated_never_abstaining: usize,
    pub items: usize,
}

/// `outcomes`: the eval set run without abstention (each judged on its answer alone).
pub fn calibrate(outcomes: &[ItemOutcome]) -> Calibration {
    let points: Vec<(f64, bool)> = outcomes.iter().map(|o| (o.confidence.unwrap_or(0.0), o.passed)).collect();
    let at = |t: f64| {
        let mut c = Calibration {
            threshold: t,
            right_answered: 0,
            wrong_withheld: 0,
            wrong_answered: 0,
            right_withheld: 0,
            separated: 0,
            separated_never_abstaining: points.iter().filter(|p| p.1).count(),
            items: points.len(),
        };
        for &(conf, right) in &points {
            match (conf >= t, right) {
                (true, true) => c.right_answered += 1,
                (true, false) => c.wrong_answered += 1,
                (false, true) => c.right_withheld += 1,
                (false, false) => c.wrong_withheld += 1,
            }
        }
        c.separated = c.right_answered + c.wrong_withheld;
        c
    };
    // Candidates: never abstaining, and midway between neighbouring confidences (and just
    // above the highest); the lowest threshold wins a tie (abstain as little as possible).
    let mut confs: Vec<f64> = points.iter().map(|p| p.0).collect();
    confs.sort_by(|a, b| a.total_cmp(b));
    confs.dedup();
    let mut candidates = vec![0.0];
    candidates.extend(confs.windows(2).map(|w| (w[0] + w[1]) / 2.0));
    if let Some(top) = confs.last() {
        candidates.push((top + 1.0) / 2.0);
    }
    candidates.into_iter().map(at).fold(at(0.0), |best, c| if c.separated > best.separated { c } else { best })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(items: Vec<EvalItem>) -> EvalSet {
        EvalSet { schema: EVAL_SET_SCHEMA.into(), abstain_below: None, refusals: vec!["I can't".into()], items }
    }

    fn item(accept: Vec<Accept>, abstain: bool) -> EvalItem {
        EvalItem { id: "a".into(), prompt_ids: vec![1], accept, abstain, max_new_tokens: 4, tags: vec![] }
    }

    #[test]
    fn answers_are_judged_by_any_accepted_form_and_refusals_decline() {
        let s = set(vec![]);
        let cite = item(vec![Accept::Contains("Section 6".into()), Accept::Regex(r"\b30 days\b".into())], false);
        assert!(judge(&s, &cite, "See section 6 of the policy.", false), "contains is case-insensitive");
        assert!(judge(&s, &cite, "Within 30 days.", false));
        assert!(!judge(&s, &cite, "Within 300 days.", false));
        assert!(!judge(&s, &cite, "Section 6", true), "an abstention never passes an answerable item");
        let exact = item(vec![Accept::Exact("Paris".into())], false);
        assert!(judge(&s, &exact, "  Paris\n", false) && !judge(&s, &exact, "Paris, France", false));
        let decline = item(vec![], true);
        assert!(judge(&s, &decline, "Sorry, I CAN'T help with that.", false));
        assert!(judge(&s, &decline, "Paris", true));
        assert!(!judge(&s, &decline, "Paris", false));
    }

    #[test]
    fn calibration_withholds_the_unsure_wrong_answers() {
        let o = |conf: f64, passed: bool| ItemOutcome {
            id: String::new(),
            passed,
            answer: String::new(),
            confidence: Some(conf),
            abstained: false,
            tags: vec![],
        };
        let outcomes = [o(0.9, true), o(0.8, true), o(0.3, false), o(0.2, false), o(0.5, true), o(0.6, false)];
        let c = calibrate(&outcomes);
        // Withholding below 0.4 keeps the right 0.5, 0.8, 0.9 and the wrong 0.6, drops 0.2 and 0.3.
        assert!((c.threshold - 0.4).abs() < 1e-12, "{c:?}");
        assert_eq!((c.right_answered, c.wrong_answered, c.wrong_withheld, c.right_withheld), (3, 1, 2, 0));
        assert_eq!((c.separated, c.separated_never_abstaining), (5, 3));
        // All right: never abstain.
        assert_eq!(calibrate(&[o(0.2, true), o(0.9, true)]).threshold, 0.0);
    }

    #[test]
    fn totals_per_tag_and_regressions() {
        let o = |id: &str, passed: bool, tags: &[&str]| ItemOutcome {
            id: id.into(),
            passed,
            answer: String::new(),
            confidence: None,
            abstained: false,
            tags: tags.iter().map(|t| t.to_string()).collect(),
        };
        let base = vec![o("a", true, &["x"]), o("b", true, &["x", "y"]), o("c", false, &[])];
        let cand = vec![o("a", true, &["x"]), o("b", false, &["x", "y"]), o("c", true, &[])];
        let t = totals(&cand);
        assert_eq!((t["passed"].as_u64(), t["total"].as_u64()), (Some(2), Some(3)));
        assert_eq!(t["by_tag"]["x"]["passed"], 1);
        assert_eq!(t["by_tag"]["y"]["total"], 1);
        assert_eq!(regressions(&base, &cand), vec!["b".to_string()]);
        assert!((accuracy(&base) - 200.0 / 3.0).abs() < 1e-9);
    }
}
