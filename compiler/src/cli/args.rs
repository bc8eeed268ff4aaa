//! The command line: every command and its flags (clap derive).

use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand, ValueEnum};

use slmc_compiler::optimize::OptRequest;

use crate::cli::bundle;

#[derive(Parser)]
#[command(name = "slmc", version, about = "Ahead-of-time compiler for small language models")]
pub(crate) struct Cli {
    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(clap::Args, Clone)]
pub(crate) struct Common {
    /// Hugging Face directory or GGUF file (default: SmolLM2-135M-Instruct from the set-up script, or $SLMC_MODEL).
    pub(crate) model: Option<PathBuf>,
    /// Print machine-readable JSON on stdout.
    #[arg(long)]
    pub(crate) json: bool,
    /// Say more on stderr (the GPU adapter, for example).
    #[arg(long)]
    pub(crate) verbose: bool,
}

/// How compiled artifacts run here: flags of the commands that execute bundles (`run`,
/// `score`, `eval`, `install`), not of `compile`.
#[derive(clap::Args, Clone, Default)]
pub(crate) struct RunArgs {
    /// GPU adapter to use for compiled artifacts: a substring of its name (else $SLMC_ADAPTER, else the first).
    #[arg(long)]
    pub(crate) adapter: Option<String>,
    /// Intra-op threads for ONNX artifacts (0: ONNX Runtime's default).
    #[arg(long, default_value_t = 0)]
    pub(crate) threads: usize,
    /// Run a Core ML artifact on slmc's reference MIL interpreter (any OS; slow; checks
    /// the package's numerics where Core ML is not available).
    #[arg(long)]
    pub(crate) mil_reference: bool,
    #[command(flatten)]
    pub(crate) trust: TrustArgs,
}

impl RunArgs {
    pub(crate) fn open_options(&self) -> slmc_runtime::registry::OpenOptions {
        slmc_runtime::registry::OpenOptions {
            adapter: self.adapter.clone(),
            threads: self.threads,
            mil_reference: self.mil_reference,
        }
    }
}

/// How bundles' signatures are checked before anything runs.
#[derive(clap::Args, Clone, Default)]
pub(crate) struct TrustArgs {
    /// Public key (from `slmc keygen`) a bundle's signature must match (else $SLMC_PUBKEY).
    #[arg(long)]
    pub(crate) pubkey: Option<PathBuf>,
    /// Run bundles without a (checkable) signature; file hashes are still checked
    /// (also $SLMC_ALLOW_UNSIGNED=1).
    #[arg(long)]
    pub(crate) allow_unsigned: bool,
}

impl TrustArgs {
    pub(crate) fn trust(&self) -> Result<slmc_runtime::bundle::Trust> {
        let key_path = self.pubkey.clone().or_else(|| std::env::var_os("SLMC_PUBKEY").map(PathBuf::from));
        let public_key = key_path.map(|p| slmc_runtime::bundle::read_public_key(&p)).transpose()?;
        let allow_unsigned = self.allow_unsigned || std::env::var("SLMC_ALLOW_UNSIGNED").is_ok_and(|v| v == "1");
        Ok(slmc_runtime::bundle::Trust { public_key, allow_unsigned })
    }
}

#[derive(Clone, Copy, ValueEnum)]
pub(crate) enum Emit {
    Ir,
    Dot,
    /// Print nothing but the report (with --json) or the pass table.
    None,
}

/// Optimizer options shared by `opt`, `run`, `score` and `quality`. Without any of them,
/// `run` and `score` execute the lowered graph as imported.
#[derive(clap::Args, Clone, Default)]
pub(crate) struct OptArgs {
    /// Named pipeline (default, gpu, portable, minimal).
    #[arg(long, conflicts_with = "passes")]
    pub(crate) pipeline: Option<String>,
    /// An explicit pass list instead of a pipeline, e.g. `fuse-qkv,dce`.
    #[arg(long, value_delimiter = ',')]
    pub(crate) passes: Vec<String>,
    /// Weight scheme for linear matrices: q4g32, q4g64, q4g128, q4g32-sym, ..., q8, f16, f32, keep.
    #[arg(long)]
    pub(crate) quant: Option<String>,
    /// Per-tensor overrides, e.g. 'lm_head=q8,embed=f16' (roles embed, lm_head, or a name substring).
    #[arg(long)]
    pub(crate) quant_override: Option<String>,
    /// rtn (round to nearest), or on calibration data: clip (clipping search), awq (activation-aware channel scales, then clip) or gptq (second-order error compensation, 4-bit schemes).
    #[arg(long)]
    pub(crate) quant_method: Option<String>,
    /// KV-cache storage: f32, f16, int8 or int4 (int8/int4: codes with a scale and minimum per
    /// token and head, the most recent positions kept exact).
    #[arg(long)]
    pub(crate) kv_quant: Option<String>,
    /// Calibration data for clip/awq/gptq: golden-style JSON, JSON Lines of messages/prompt/text samples (an eval set), or text, one sample per line (default: built-in samples).
    #[arg(long)]
    pub(crate) calibration: Option<PathBuf>,
    /// Print the IR to stderr after PASS (repeatable, or `all`).
    #[arg(long, value_delimiter = ',')]
    pub(crate) print_after: Vec<String>,
    /// Write numbered IR files (000_input.slir, NNN_<pass>.slir) into DIR.
    #[arg(long)]
    pub(crate) dump_ir: Option<PathBuf>,
    /// Skip PASS (repeatable).
    #[arg(long, value_delimiter = ',')]
    pub(crate) disable_pass: Vec<String>,
    /// Print a table of wall time per pass to stderr.
    #[arg(long)]
    pub(crate) time_passes: bool,
}

impl OptArgs {
    pub(crate) fn request(&self) -> OptRequest {
        OptRequest {
            pipeline: self.pipeline.clone(),
            passes: self.passes.clone(),
            quant: self.quant.clone(),
            quant_override: self.quant_override.clone(),
            quant_method: self.quant_method.clone(),
            kv_quant: self.kv_quant.clone(),
            calibration: self.calibration.clone(),
            print_after: self.print_after.clone(),
            dump_ir: self.dump_ir.clone(),
            disable_pass: self.disable_pass.clone(),
        }
    }
}

#[derive(Clone, Copy, ValueEnum)]
pub(crate) enum ConvertTo {
    Hf,
}

#[derive(Subcommand)]
pub(crate) enum Command {
    /// Architecture, parameter count, bytes per dtype and the tensor table.
    Inspect {
        #[command(flatten)]
        common: Common,
    },
    /// Lower a model to slmc's IR and print it.
    Lower {
        #[command(flatten)]
        common: Common,
        #[arg(long, value_enum, default_value = "ir")]
        emit: Emit,
    },
    /// Compile for one or more target profiles (`slmc targets list`): a bundle in OUT/<target>/ per target.
    Compile {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        opt: OptArgs,
        #[command(flatten)]
        args: bundle::CompileArgs,
    },
    /// Run the optimizer and print the optimized IR (and the pass report).
    Opt {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        opt: OptArgs,
        #[arg(long, value_enum, default_value = "ir")]
        emit: Emit,
    },
    /// Compare the optimized model with the unoptimized one, teacher-forced.
    Quality {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        opt: OptArgs,
        /// Evaluation prompts: golden-style JSON (prompts[].input_ids + generated_ids) or text, one per line
        /// (default: $SLMC_GOLDEN/smollm2-135m-greedy.json or ../shared/golden/smollm2-135m-greedy.json).
        #[arg(long)]
        prompts: Option<PathBuf>,
        /// Fail when top-1 agreement drops by more than this many percentage points.
        #[arg(long)]
        max_quality_drop: Option<f64>,
    },
    /// Parse, verify and re-print an IR text file.
    Cat {
        file: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Greedy generation on the reference interpreter.
    Run {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        run: RunArgs,
        #[command(flatten)]
        prompt: PromptArgs,
        #[command(flatten)]
        generation: GenerationArgs,
        #[command(flatten)]
        opt: OptArgs,
    },
    /// Teacher-forced scoring of a continuation.
    Score {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        run: RunArgs,
        #[arg(long, value_delimiter = ',', required = true)]
        prompt_ids: Vec<u32>,
        #[arg(long, value_delimiter = ',', required = true)]
        continuation_ids: Vec<u32>,
        /// Feed the continuation one token per step after the prompt (the decode path greedy
        /// generation takes) instead of in one prefill with the prompt.
        #[arg(long)]
        decode: bool,
        #[command(flatten)]
        opt: OptArgs,
    },
    /// Tokenize text (and decode it back) with the model's tokenizer.
    Tokenize {
        #[command(flatten)]
        common: Common,
        #[arg(long, required = true)]
        text: Vec<String>,
    },
    /// Convert a GGUF file to a Hugging Face directory.
    Convert {
        #[command(flatten)]
        common: Common,
        #[arg(long, value_enum)]
        to: ConvertTo,
        /// Output directory (must not exist unless --force).
        out_dir: PathBuf,
        /// dtype of model.safetensors: f32, f16 or bf16.
        #[arg(long, default_value = "f32")]
        dtype: String,
        #[arg(long)]
        force: bool,
    },
    /// A new ed25519 key pair for signing bundles: KEY (secret) and KEY.pub.
    Keygen {
        #[arg(long = "out")]
        out: PathBuf,
        #[arg(long)]
        force: bool,
        #[arg(long)]
        json: bool,
    },
    /// Sign a bundle (ed25519 over its manifest, which lists every file's sha256).
    Sign {
        bundle: PathBuf,
        #[arg(long)]
        key: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Check a bundle's signature, runtime version and every file's sha256.
    Verify {
        bundle: PathBuf,
        #[command(flatten)]
        trust: TrustArgs,
        #[arg(long)]
        json: bool,
    },
    /// Run a bundle's golden smoke set and its eval set (if it has one) on its executor.
    Eval {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        run: RunArgs,
        /// Suggest the --abstain-below threshold that best separates right from wrong
        /// answers on the bundle's eval set.
        #[arg(long)]
        calibrate: bool,
    },
    /// Verify a bundle, run its smoke set, and make it the store's current version.
    Install {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        run: RunArgs,
        #[arg(long)]
        store: PathBuf,
    },
    /// Speed and memory of bundles and checkpoints: load time, TTFT, prefill/decode
    /// tokens/s, per-token latency percentiles, peak RSS; `--duration` for a sustained run.
    Bench(crate::cli::bench::BenchArgs),
    /// An OpenAI-compatible local server for a bundle: /v1/chat/completions,
    /// /v1/completions (streaming or not), /v1/models, /health; with --web, the browser
    /// page that runs a webgpu bundle on the page's own GPU.
    Serve(crate::cli::serve::ServeArgs),
    /// Switch the store back to its previous version.
    Rollback {
        #[arg(long)]
        store: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// The device target catalog.
    Targets {
        #[command(subcommand)]
        action: TargetsAction,
        /// Print machine-readable JSON on stdout.
        #[arg(long, global = true)]
        json: bool,
    },
}

#[derive(clap::Subcommand)]
pub(crate) enum TargetsAction {
    /// Every profile: name, version, backend, family.
    List,
    /// One profile in full (unknown facts shown as unknown).
    Show { name: String },
}

/// How `run` generates and what it reports.
#[derive(clap::Args, Clone)]
pub(crate) struct GenerationArgs {
    #[arg(long, default_value_t = 64)]
    pub(crate) max_new_tokens: usize,
    /// Keep generating after the end-of-sequence token.
    #[arg(long)]
    pub(crate) ignore_eos: bool,
    /// Record the top logits of the first N steps (prefill is step 0) in the JSON.
    #[arg(long, default_value_t = 0)]
    pub(crate) record_logits: usize,
    /// How many of the largest logits each recorded step keeps.
    #[arg(long, default_value_t = 20)]
    pub(crate) record_top_k: usize,
    /// Answer with the abstention instead (JSON `abstained: true`, exit code 3) when the
    /// answer's confidence, the geometric mean of its tokens' probabilities, is below X.
    #[arg(long, value_parser = probability)]
    pub(crate) abstain_below: Option<f64>,
}

pub(crate) fn probability(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(p) if (0.0..=1.0).contains(&p) => Ok(p),
        _ => Err(format!("`{s}`: a confidence threshold is a number from 0 to 1")),
    }
}

#[derive(clap::Args, Clone)]
pub(crate) struct PromptArgs {
    /// Prompt text (tokenized with the model's tokenizer).
    #[arg(long, conflicts_with = "prompt_ids")]
    pub(crate) prompt: Option<String>,
    /// Prompt token ids, comma-separated.
    #[arg(long, value_delimiter = ',')]
    pub(crate) prompt_ids: Option<Vec<u32>>,
    /// Wrap --prompt as a user message in the model's chat template.
    #[arg(long, requires = "prompt")]
    pub(crate) chat: bool,
}
