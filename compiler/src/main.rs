//! The `slmc` command line. Every command takes `--json` for pipelines; errors go to
//! stderr (and, with `--json`, as `{"error": ...}` to stdout) with a non-zero exit.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{anyhow, bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use serde_json::{json, Value};
use slmc_compiler::import::tokenizer::{render_chat, Message};
use slmc_compiler::import::{self, Model};
use slmc_compiler::optimize::{golden_sequences, optimize, OptRequest, Optimized};
use slmc_compiler::{convert, default_model_path, lower};
use slmc_ir::DType;
use slmc_ir::Layered;

mod bundle_cli;
use slmc_runtime::{generate, score_with, GenerateOptions, InterpreterExecutor};

#[derive(Parser)]
#[command(name = "slmc", version, about = "Ahead-of-time compiler for small language models")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args, Clone)]
struct Common {
    /// Hugging Face directory or GGUF file (default: SmolLM2-135M-Instruct from the set-up script, or $SLMC_MODEL).
    model: Option<PathBuf>,
    /// Print machine-readable JSON on stdout.
    #[arg(long)]
    json: bool,
    /// Say more on stderr (the GPU adapter, for example).
    #[arg(long)]
    verbose: bool,
    /// GPU adapter to use for compiled artifacts: a substring of its name (else $SLMC_ADAPTER, else the first).
    #[arg(long)]
    adapter: Option<String>,
    /// Intra-op threads for ONNX artifacts (0: ONNX Runtime's default).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Run a Core ML artifact on slmc's reference MIL interpreter (any OS; slow; checks
    /// the package's numerics where Core ML is not available).
    #[arg(long)]
    mil_reference: bool,
    #[command(flatten)]
    trust: TrustArgs,
}

impl Common {
    fn open_options(&self) -> slmc_runtime::registry::OpenOptions {
        slmc_runtime::registry::OpenOptions {
            adapter: self.adapter.clone(),
            threads: self.threads,
            mil_reference: self.mil_reference,
        }
    }
}

/// How bundles' signatures are checked before anything runs.
#[derive(clap::Args, Clone, Default)]
struct TrustArgs {
    /// Public key (from `slmc keygen`) a bundle's signature must match (else $SLMC_PUBKEY).
    #[arg(long)]
    pubkey: Option<PathBuf>,
    /// Run bundles without a (checkable) signature; file hashes are still checked
    /// (also $SLMC_ALLOW_UNSIGNED=1).
    #[arg(long)]
    allow_unsigned: bool,
}

impl TrustArgs {
    fn trust(&self) -> Result<slmc_runtime::bundle::Trust> {
        let key_path = self.pubkey.clone().or_else(|| std::env::var_os("SLMC_PUBKEY").map(PathBuf::from));
        let public_key = key_path.map(|p| slmc_runtime::bundle::read_public_key(&p)).transpose()?;
        let allow_unsigned = self.allow_unsigned || std::env::var("SLMC_ALLOW_UNSIGNED").is_ok_and(|v| v == "1");
        Ok(slmc_runtime::bundle::Trust { public_key, allow_unsigned })
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum Emit {
    Ir,
    Dot,
    /// Print nothing but the report (with --json) or the pass table.
    None,
}

/// Optimizer options shared by `opt`, `run`, `score` and `quality`. Without any of them,
/// `run` and `score` execute the lowered graph as imported.
#[derive(clap::Args, Clone, Default)]
struct OptArgs {
    /// Named pipeline (default, gpu, portable, minimal).
    #[arg(long, conflicts_with = "passes")]
    pipeline: Option<String>,
    /// An explicit pass list instead of a pipeline, e.g. `fuse-qkv,dce`.
    #[arg(long, value_delimiter = ',')]
    passes: Vec<String>,
    /// Weight scheme for linear matrices: q4g32, q4g64, q4g128, q4g32-sym, ..., q8, f16, f32, keep.
    #[arg(long)]
    quant: Option<String>,
    /// Per-tensor overrides, e.g. 'lm_head=q8,embed=f16' (roles embed, lm_head, or a name substring).
    #[arg(long)]
    quant_override: Option<String>,
    /// rtn (round to nearest) or clip (activation-aware clipping search on calibration data).
    #[arg(long)]
    quant_method: Option<String>,
    /// KV-cache storage: f32, int8 or int4 (per token and head scales).
    #[arg(long)]
    kv_quant: Option<String>,
    /// Calibration data for --quant-method clip: golden-style JSON or text, one sample per line.
    #[arg(long)]
    calibration: Option<PathBuf>,
    /// Print the IR to stderr after PASS (repeatable, or `all`).
    #[arg(long, value_delimiter = ',')]
    print_after: Vec<String>,
    /// Write numbered IR files (000_input.slir, NNN_<pass>.slir) into DIR.
    #[arg(long)]
    dump_ir: Option<PathBuf>,
    /// Skip PASS (repeatable).
    #[arg(long, value_delimiter = ',')]
    disable_pass: Vec<String>,
    /// Print a table of wall time per pass to stderr.
    #[arg(long)]
    time_passes: bool,
}

impl OptArgs {
    fn request(&self) -> OptRequest {
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
enum ConvertTo {
    Hf,
}

#[derive(Subcommand)]
enum Command {
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
    /// Compile for one or more targets: OUT/<target>/ per target (webgpu, vulkan, metal).
    Compile {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        opt: OptArgs,
        #[command(flatten)]
        args: bundle_cli::CompileArgs,
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
        prompt: PromptArgs,
        #[arg(long, default_value_t = 64)]
        max_new_tokens: usize,
        /// Keep generating after the end-of-sequence token.
        #[arg(long)]
        ignore_eos: bool,
        /// Record the top logits of the first N steps (prefill is step 0) in the JSON.
        #[arg(long, default_value_t = 0)]
        record_logits: usize,
        /// How many of the largest logits each recorded step keeps.
        #[arg(long, default_value_t = 20)]
        record_top_k: usize,
        #[command(flatten)]
        opt: OptArgs,
    },
    /// Teacher-forced scoring of a continuation.
    Score {
        #[command(flatten)]
        common: Common,
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
    /// Run a bundle's golden smoke set on its executor.
    Eval {
        #[command(flatten)]
        common: Common,
    },
    /// Verify a bundle, run its smoke set, and make it the store's current version.
    Install {
        #[command(flatten)]
        common: Common,
        #[arg(long)]
        store: PathBuf,
    },
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
enum TargetsAction {
    /// Every profile: name, version, backend, family.
    List,
    /// One profile in full (unknown facts shown as unknown).
    Show { name: String },
}

#[derive(clap::Args, Clone)]
struct PromptArgs {
    /// Prompt text (tokenized with the model's tokenizer).
    #[arg(long, conflicts_with = "prompt_ids")]
    prompt: Option<String>,
    /// Prompt token ids, comma-separated.
    #[arg(long, value_delimiter = ',')]
    prompt_ids: Option<Vec<u32>>,
    /// Wrap --prompt as a user message in the model's chat template.
    #[arg(long, requires = "prompt")]
    chat: bool,
}

fn main() -> ExitCode {
    #[cfg(unix)]
    // SAFETY: called before any other thread exists; resets one signal disposition.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = Cli::parse();
    let json = match &cli.command {
        Command::Inspect { common }
        | Command::Lower { common, .. }
        | Command::Run { common, .. }
        | Command::Opt { common, .. }
        | Command::Compile { common, .. }
        | Command::Quality { common, .. }
        | Command::Score { common, .. }
        | Command::Tokenize { common, .. }
        | Command::Convert { common, .. } => common.json,
        Command::Eval { common } | Command::Install { common, .. } => common.json,
        Command::Cat { json, .. }
        | Command::Targets { json, .. }
        | Command::Keygen { json, .. }
        | Command::Sign { json, .. }
        | Command::Verify { json, .. }
        | Command::Rollback { json, .. } => *json,
    };
    match dispatch(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let message = format!("{e:#}");
            eprintln!("error: {message}");
            if json {
                println!("{}", json!({ "error": message }));
            }
            ExitCode::FAILURE
        }
    }
}

fn load(common: &Common) -> Result<Model> {
    let path = common.model.clone().unwrap_or_else(default_model_path);
    if common.model.is_none() && !path.exists() {
        bail!("{}: the default model is missing; run scripts/setup first (or pass MODEL)", path.display());
    }
    Ok(import::load(&path)?)
}

fn print_json(v: &Value) {
    println!("{}", serde_json::to_string_pretty(v).expect("JSON values serialize"));
}

fn targets_command(action: TargetsAction, json: bool) -> Result<()> {
    match action {
        TargetsAction::List => {
            let all = slmc_targets::catalog();
            if json {
                let rows: Vec<Value> = all
                    .iter()
                    .map(|p| json!({ "name": p.name, "version": p.version, "backend": p.backend, "family": p.family, "description": p.description }))
                    .collect();
                print_json(&json!({ "targets": rows }));
            } else {
                for p in all {
                    println!("{:<20} v{:<3} {:<7} {}", p.name, p.version, p.backend, p.description);
                }
            }
        }
        TargetsAction::Show { name } => {
            let p = slmc_targets::lookup(&name)?;
            if json {
                print_json(&serde_json::to_value(p)?);
            } else {
                let unknown = |v: Option<String>| v.unwrap_or_else(|| "unknown".into());
                let bytes = |v: Option<u64>| unknown(v.map(|b| format!("{b} bytes")));
                println!("{} (version {}): {}", p.name, p.version, p.description);
                println!("  family:              {}", p.family);
                println!("  backend:             {}", p.backend);
                println!("  shader language:     {}", p.shader_language.clone().unwrap_or_else(|| "none".into()));
                println!("  storage binding:     {}", bytes(p.limits.max_storage_buffer_binding_size));
                println!("  buffer:              {}", bytes(p.limits.max_buffer_size));
                println!("  workgroup storage:   {}", bytes(p.limits.max_compute_workgroup_storage_size));
                println!(
                    "  invocations/group:   {}",
                    unknown(p.limits.max_compute_invocations_per_workgroup.map(|v| v.to_string()))
                );
                println!(
                    "  storage buffers:     {}",
                    unknown(p.limits.max_storage_buffers_per_shader_stage.map(|v| v.to_string()))
                );
                println!(
                    "  features:            {}",
                    if p.features.is_empty() { "none".into() } else { p.features.join(", ") }
                );
                println!("  subgroup sizes:      {}", unknown(p.subgroup_sizes.map(|[a, b]| format!("{a}..{b}"))));
                println!("  RAM:                 {}", bytes(p.ram_bytes));
                println!("  memory bandwidth:    {}", unknown(p.memory_bandwidth_gbps.map(|v| format!("{v} GB/s"))));
                println!(
                    "  NPU:                 {}",
                    unknown(
                        p.npu
                            .clone()
                            .map(|n| format!("{n} via {}", p.npu_runtime.clone().unwrap_or_else(|| "unknown".into())))
                    )
                );
                println!("  minimum OS:          {}", unknown(p.min_os.clone()));
                println!("  minimum runtime:     {}", unknown(p.min_runtime.clone()));
                println!("  sources:             {}", p.sources);
            }
        }
    }
    Ok(())
}

fn dispatch(command: Command) -> Result<()> {
    match command {
        Command::Targets { action, json } => targets_command(action, json),
        Command::Keygen { out, force, json } => bundle_cli::keygen(&out, force, json),
        Command::Sign { bundle, key, json } => bundle_cli::sign(&bundle, &key, json),
        Command::Verify { bundle, trust, json } => bundle_cli::verify(&bundle, &trust, json),
        Command::Eval { common } => bundle_cli::eval(&common),
        Command::Install { common, store } => bundle_cli::install(&common, &store),
        Command::Rollback { store, json } => bundle_cli::rollback(&store, json),
        Command::Inspect { common } => inspect(&load(&common)?, common.json),
        Command::Lower { common, emit } => {
            let model = load(&common)?;
            let graph = lower::lower(&model)?;
            let text = match emit {
                Emit::Ir => slmc_ir::text::print(&graph),
                Emit::Dot => graph.to_dot(),
                Emit::None => String::new(),
            };
            if common.json {
                print_json(&json!({ "graph": graph.name, "nodes": graph.len(), "text": text }));
            } else {
                print!("{text}");
            }
            Ok(())
        }
        Command::Cat { file, json } => {
            let text = std::fs::read_to_string(&file).with_context(|| format!("{}: cannot read", file.display()))?;
            let graph = slmc_ir::text::parse(&text).map_err(|e| anyhow!("{}: {e}", file.display()))?;
            slmc_ir::verify(&graph).map_err(|e| anyhow!("{}: {e}", file.display()))?;
            let printed = slmc_ir::text::print(&graph);
            if json {
                print_json(&json!({ "graph": graph.name, "nodes": graph.len(), "text": printed }));
            } else {
                print!("{printed}");
            }
            Ok(())
        }
        Command::Run { common, prompt, max_new_tokens, ignore_eos, record_logits, record_top_k, opt } => {
            run(&common, &prompt, max_new_tokens, ignore_eos, (record_logits, record_top_k), &opt)
        }
        Command::Opt { common, opt, emit } => opt_command(&common, &opt, emit),
        Command::Compile { common, opt, args } => bundle_cli::compile_command(&common, opt, args),
        Command::Quality { common, opt, prompts, max_quality_drop } => {
            quality_command(&common, &opt, prompts.as_deref(), max_quality_drop)
        }
        Command::Score { common, prompt_ids, continuation_ids, decode, opt } => {
            let s = match artifact_executor(&common, &opt)? {
                Some((mut exec, _, _)) => score_with(exec.as_mut(), &prompt_ids, &continuation_ids, decode)?,
                None => {
                    let model = load(&common)?;
                    let prepared = prepare(&model, &opt, false)?;
                    let weights = Layered { top: &prepared.derived, base: &model.weights };
                    let mut exec =
                        InterpreterExecutor::new(&prepared.graph, &weights, model.config.max_position_embeddings)?;
                    score_with(&mut exec, &prompt_ids, &continuation_ids, decode)?
                }
            };
            let positions: Vec<Value> = s
                .positions
                .iter()
                .map(|p| json!({ "token": p.token, "argmax": p.argmax, "logprob": p.logprob, "top1_minus_top2": p.top1_minus_top2 }))
                .collect();
            if common.json {
                print_json(&json!({
                    "top1_agreement": s.top1_agreement,
                    "mean_nll": s.mean_nll,
                    "perplexity": s.mean_nll.exp(),
                    "positions": positions,
                }));
            } else {
                println!("positions:      {}", s.positions.len());
                println!("top1_agreement: {:.4}", s.top1_agreement);
                println!("mean_nll:       {:.4}", s.mean_nll);
                println!("perplexity:     {:.3}", s.mean_nll.exp());
            }
            Ok(())
        }
        Command::Tokenize { common, text } => {
            let model = load(&common)?;
            let tok = model.tokenizer.as_ref().map_err(|e| anyhow!("{e}"))?;
            let mut out = Vec::new();
            for t in &text {
                let enc = tok.encode(t.as_str(), false).map_err(|e| anyhow!("tokenizing: {e}"))?;
                let decoded = tok.decode(enc.get_ids(), false).map_err(|e| anyhow!("decoding: {e}"))?;
                out.push(json!({ "text": t, "ids": enc.get_ids(), "tokens": enc.get_tokens(), "decoded": decoded }));
            }
            if common.json {
                print_json(&Value::Array(out));
            } else {
                for o in out {
                    println!("{}", o["ids"]);
                }
            }
            Ok(())
        }
        Command::Convert { common, to: ConvertTo::Hf, out_dir, dtype, force } => {
            let dtype = DType::from_name(&dtype).ok_or_else(|| anyhow!("unknown dtype `{dtype}` (f32, f16, bf16)"))?;
            let model = load(&common)?;
            convert::to_hf(&model, &out_dir, dtype, force)?;
            if common.json {
                print_json(&json!({ "out_dir": out_dir, "dtype": dtype.name() }));
            } else {
                eprintln!("wrote {}", out_dir.display());
            }
            Ok(())
        }
    }
}

fn inspect(model: &Model, as_json: bool) -> Result<()> {
    let mut by_dtype: std::collections::BTreeMap<&str, (usize, usize)> = Default::default();
    let mut params = 0usize;
    let mut table = Vec::new();
    for (name, t) in model.weights.tensors() {
        let n: usize = t.shape.iter().product();
        params += n;
        let e = by_dtype.entry(t.dtype.name()).or_default();
        e.0 += t.len;
        e.1 += 1;
        table.push(json!({ "name": name, "dtype": t.dtype.name(), "shape": t.shape, "bytes": t.len }));
    }
    let files: Vec<String> = model.weights.files().map(|p| p.display().to_string()).collect();
    let report = json!({
        "path": model.path,
        "format": model.format.name(),
        "architecture": model.config.arch_name,
        "parameters": params,
        "bytes_by_dtype": by_dtype.iter().map(|(k, v)| (k.to_string(), json!(v.0))).collect::<serde_json::Map<_, _>>(),
        "tensors_by_dtype": by_dtype.iter().map(|(k, v)| (k.to_string(), json!(v.1))).collect::<serde_json::Map<_, _>>(),
        "config": model.config.to_json(),
        "files": files,
        "tokenizer": match &model.tokenizer { Ok(t) => json!({ "vocab_size": t.get_vocab_size(true) }), Err(e) => json!({ "error": e }) },
        "chat_template": model.chat_template.is_some(),
        "tensors": table,
    });
    if as_json {
        print_json(&report);
        return Ok(());
    }
    let c = &model.config;
    println!("model:        {}", model.path.display());
    println!("format:       {}", model.format.name());
    println!(
        "architecture: {} ({} layers, hidden {}, heads {}/{} kv, head_dim {}, ffn {}, vocab {})",
        c.arch_name,
        c.num_layers(),
        c.hidden_size,
        c.num_heads,
        c.num_kv_heads,
        c.head_dim,
        c.intermediate_size,
        c.vocab_size
    );
    println!("parameters:   {params} ({:.1} M)", params as f64 / 1e6);
    for (dtype, (bytes, count)) in &by_dtype {
        println!("  {dtype:>5}: {count:>4} tensors, {bytes} bytes");
    }
    println!("tensors:");
    for row in &table {
        println!(
            "  {:<48} {:>5} {}",
            row["name"].as_str().unwrap_or(""),
            row["dtype"].as_str().unwrap_or(""),
            row["shape"]
        );
    }
    Ok(())
}

/// Text handling of whatever is being run: a model's tokenizer and chat template, or the
/// copies an artifact carries.
struct TextSide {
    origin: PathBuf,
    tokenizer: Result<tokenizers::Tokenizer, String>,
    chat_template: Option<String>,
    bos_token: Option<String>,
    eos_token: Option<String>,
    eos_ids: Vec<u32>,
}

impl TextSide {
    fn of_model(model: &Model) -> TextSide {
        TextSide {
            origin: model.path.clone(),
            tokenizer: model.tokenizer.clone(),
            chat_template: model.chat_template.clone(),
            bos_token: model.bos_token.clone(),
            eos_token: model.eos_token.clone(),
            eos_ids: model.config.eos_token_ids.clone(),
        }
    }

    fn of_artifact(dir: &std::path::Path, eos_ids: Vec<u32>) -> Result<TextSide> {
        let tok_path = dir.join("tokenizer.json");
        let tokenizer = if tok_path.exists() {
            tokenizers::Tokenizer::from_file(&tok_path).map_err(|e| format!("{}: {e}", tok_path.display()))
        } else {
            Err(format!("{} has no tokenizer.json", dir.display()))
        };
        let (chat_template, bos_token, eos_token) = slmc_compiler::import::hf::read_tokenizer_config(dir)?;
        Ok(TextSide { origin: dir.to_path_buf(), tokenizer, chat_template, bos_token, eos_token, eos_ids })
    }

    fn prompt_ids(&self, prompt: &PromptArgs) -> Result<Vec<u32>> {
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

/// A compiled artifact's executor, its name for `--json`, and its text side: a compiled
/// artifact directory given as MODEL (`artifact.json`), opened by the runtime's registry.
type LoadedArtifact = (Box<dyn slmc_runtime::Executor>, &'static str, TextSide);

fn artifact_executor(common: &Common, opt: &OptArgs) -> Result<Option<LoadedArtifact>> {
    let Some(path) = common.model.as_ref().filter(|p| p.join("artifact.json").is_file()) else {
        return Ok(None);
    };
    if opt.request().is_active() {
        bail!("{}: optimizer flags apply when compiling; this is a compiled artifact", path.display());
    }
    let trust = common.trust.trust()?;
    if slmc_runtime::bundle::is_bundle(path) {
        slmc_runtime::bundle::verify(path, &trust)?;
    } else if !trust.allow_unsigned {
        bail!(
            "{}: not a bundle (no manifest.json): refusing it (pass --allow-unsigned to run a bare artifact)",
            path.display()
        );
    }
    let opened = slmc_runtime::registry::open(path, &common.open_options())?;
    if common.verbose {
        eprintln!("{}", opened.detail);
    }
    let side = TextSide::of_artifact(path, opened.eos_token_ids)?;
    Ok(Some((opened.exec, opened.executor_name, side)))
}

fn run(
    common: &Common,
    prompt: &PromptArgs,
    max_new_tokens: usize,
    ignore_eos: bool,
    record: (usize, usize),
    opt: &OptArgs,
) -> Result<()> {
    if let Some((mut exec, name, side)) = artifact_executor(common, opt)? {
        let prompt_ids = side.prompt_ids(prompt)?;
        return generate_and_print(common, exec.as_mut(), name, &side, &prompt_ids, max_new_tokens, ignore_eos, record);
    }
    let model = load(common)?;
    let side = TextSide::of_model(&model);
    let prompt_ids = side.prompt_ids(prompt)?;
    let prepared = prepare(&model, opt, false)?;
    let weights = Layered { top: &prepared.derived, base: &model.weights };
    let mut exec = InterpreterExecutor::new(&prepared.graph, &weights, model.config.max_position_embeddings)?;
    generate_and_print(common, &mut exec, "interpreter", &side, &prompt_ids, max_new_tokens, ignore_eos, record)
}

#[allow(clippy::too_many_arguments)]
fn generate_and_print(
    common: &Common,
    exec: &mut dyn slmc_runtime::Executor,
    executor: &str,
    side: &TextSide,
    prompt_ids: &[u32],
    max_new_tokens: usize,
    ignore_eos: bool,
    record: (usize, usize),
) -> Result<()> {
    let opts = GenerateOptions {
        max_new_tokens,
        stop_ids: if ignore_eos { vec![] } else { side.eos_ids.clone() },
        record_steps: record.0,
        record_top_k: record.1,
    };
    let tok = side.tokenizer.as_ref().ok();
    let mut streamed = String::new();
    let mut so_far = Vec::new();
    let stream = !common.json && tok.is_some();
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
        }));
    } else {
        if !stream {
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
    }
    Ok(())
}

/// The graph a command executes: lowered, then optimized when asked (or `force`d).
fn prepare(model: &Model, opt: &OptArgs, force: bool) -> Result<Optimized> {
    let graph = lower::lower(model)?;
    let req = opt.request();
    if !force && !req.is_active() {
        return Ok(Optimized {
            graph,
            derived: Default::default(),
            passes: vec![],
            timings: vec![],
            memory_plan: None,
            policy: Default::default(),
            kv_quant: Default::default(),
        });
    }
    let mut stderr = std::io::stderr();
    let optimized = optimize(model, graph, &req, Some(&mut stderr))?;
    if opt.time_passes {
        eprint!("{}", slmc_passes::format_timings(&optimized.timings));
    }
    Ok(optimized)
}

fn memory_json(plan: &slmc_passes::MemoryPlan) -> Value {
    let arena = |a: &slmc_passes::memory::ArenaPlan| {
        json!({
            "tokens": a.tokens,
            "past": a.past,
            "buffers": a.buffers,
            "arena_bytes": a.arena_bytes,
            "one_buffer_per_value_bytes": a.one_buffer_per_value_bytes,
            "live_peak_bytes": a.live_peak_bytes,
        })
    };
    json!({
        "weight_bytes": plan.weight_bytes,
        "kv_bytes_per_token": plan.kv_bytes_per_token,
        "kv_scale_bytes_per_token": plan.kv_scale_bytes_per_token,
        "kv_bytes_per_token_f32": plan.kv_bytes_per_token_f32,
        "context_len": plan.context_len,
        "prefill": arena(&plan.prefill),
        "decode": arena(&plan.decode),
    })
}

fn opt_command(common: &Common, opt: &OptArgs, emit: Emit) -> Result<()> {
    let model = load(common)?;
    let optimized = prepare(&model, opt, true)?;
    let text = match emit {
        Emit::Ir => slmc_ir::text::print(&optimized.graph),
        Emit::Dot => optimized.graph.to_dot(),
        Emit::None => String::new(),
    };
    if common.json {
        let passes: Vec<Value> = optimized
            .timings
            .iter()
            .map(|t| json!({ "pass": t.pass, "wall_ms": t.wall.as_secs_f64() * 1e3, "changes": t.changes, "nodes": t.nodes_after }))
            .collect();
        print_json(&json!({
            "pipeline": optimized.passes,
            "passes": passes,
            "quant": optimized.policy.scheme.map(|s| s.name()),
            "quant_method": optimized.policy.method.name(),
            "kv_quant": optimized.kv_quant.name(),
            "derived_weights": optimized.derived.len(),
            "memory": optimized.memory_plan.as_ref().map(memory_json),
            "nodes": optimized.graph.len(),
            "text": text,
        }));
    } else {
        print!("{text}");
        if let Some(plan) = &optimized.memory_plan {
            eprintln!(
                "memory: weights {} B, KV {} B/token (f32 would be {}), activations prefill({}) {} B planned vs {} B one-per-value, decode {} B vs {} B",
                plan.weight_bytes,
                plan.kv_bytes_per_token,
                plan.kv_bytes_per_token_f32,
                plan.prefill.tokens,
                plan.prefill.arena_bytes,
                plan.prefill.one_buffer_per_value_bytes,
                plan.decode.arena_bytes,
                plan.decode.one_buffer_per_value_bytes
            );
        }
    }
    Ok(())
}

fn default_prompts_file() -> Option<PathBuf> {
    let dir = std::env::var_os("SLMC_GOLDEN").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("../shared/golden"));
    let file = dir.join("smollm2-135m-greedy.json");
    file.exists().then_some(file)
}

fn quality_cases(model: &Model, file: &std::path::Path) -> Result<Vec<slmc_runtime::QualityCase>> {
    let text = std::fs::read_to_string(file).with_context(|| format!("{}: cannot read", file.display()))?;
    if let Ok(json) = serde_json::from_str::<Value>(&text) {
        let prompts = golden_sequences(&json).with_context(|| format!("{}: not a prompts file", file.display()))?;
        let lens: Vec<usize> = json["prompts"]
            .as_array()
            .map(|a| a.iter().map(|p| p["input_ids"].as_array().map(|x| x.len()).unwrap_or(0)).collect())
            .unwrap_or_default();
        return Ok(prompts
            .into_iter()
            .zip(lens)
            .map(|(seq, n)| slmc_runtime::QualityCase { prompt: seq[..n].to_vec(), continuation: seq[n..].to_vec() })
            .collect());
    }
    // Text: each line is scored on itself after its first token.
    let tok = model.tokenizer.as_ref().map_err(|e| anyhow!("text prompts need a tokenizer: {e}"))?;
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let ids = tok.encode(l, false).map_err(|e| anyhow!("tokenizing: {e}"))?.get_ids().to_vec();
            if ids.len() < 2 {
                bail!("{}: a prompt line needs at least two tokens", file.display());
            }
            Ok(slmc_runtime::QualityCase { prompt: ids[..1].to_vec(), continuation: ids[1..].to_vec() })
        })
        .collect()
}

fn quality_command(
    common: &Common,
    opt: &OptArgs,
    prompts: Option<&std::path::Path>,
    max_drop: Option<f64>,
) -> Result<()> {
    let model = load(common)?;
    let file = match prompts {
        Some(p) => p.to_path_buf(),
        None => default_prompts_file().ok_or_else(|| anyhow!("no golden prompts found: give --prompts FILE"))?,
    };
    let cases = quality_cases(&model, &file)?;
    let base_graph = lower::lower(&model)?;
    let optimized = prepare(&model, opt, true)?;
    let weights = Layered { top: &optimized.derived, base: &model.weights };
    let ctx = model.config.max_position_embeddings;
    let mut base = InterpreterExecutor::new(&base_graph, &model.weights, ctx)?;
    let mut opt_exec = InterpreterExecutor::new(&optimized.graph, &weights, ctx)?;
    let r = slmc_runtime::compare_quality(&mut base, &mut opt_exec, &cases)?;
    let drop_points = 100.0 * (1.0 - r.top1_agreement);
    let report = json!({
        "prompts_file": file,
        "cases": r.cases,
        "positions": r.positions,
        "quant": optimized.policy.scheme.map(|s| s.name()),
        "quant_method": optimized.policy.method.name(),
        "kv_quant": optimized.kv_quant.name(),
        "top1_agreement": r.top1_agreement,
        "top1_agreement_reference": r.top1_agreement_reference,
        "base_top1_agreement_reference": r.base_top1_agreement_reference,
        "mean_kl": r.mean_kl,
        "perplexity_base": r.perplexity_base,
        "perplexity_optimized": r.perplexity_optimized,
        "perplexity_change_pct": 100.0 * (r.perplexity_optimized / r.perplexity_base - 1.0),
        "quality_drop_points": drop_points,
        "max_quality_drop": max_drop,
        "memory": optimized.memory_plan.as_ref().map(memory_json),
    });
    let failure = max_drop
        .filter(|limit| drop_points > *limit)
        .map(|limit| format!("quality drop of {drop_points:.2} top-1 points exceeds --max-quality-drop {limit}"));
    if common.json {
        let mut report = report;
        report["passed"] = json!(failure.is_none());
        if let Some(f) = &failure {
            report["error"] = json!(f);
        }
        print_json(&report);
        if let Some(f) = failure {
            // The report above is the one JSON document on stdout; the error goes to stderr.
            eprintln!("error: {f}");
            std::process::exit(1);
        }
    } else {
        println!("positions:                {} over {} prompts", r.positions, r.cases);
        println!("top-1 agreement:          {:.4} (with the unoptimized model)", r.top1_agreement);
        println!(
            "top-1 vs reference:       {:.4} (unoptimized: {:.4})",
            r.top1_agreement_reference, r.base_top1_agreement_reference
        );
        println!("mean KL:                  {:.4} nats", r.mean_kl);
        println!("perplexity:               {:.3} -> {:.3}", r.perplexity_base, r.perplexity_optimized);
    }
    match failure {
        Some(f) => bail!(f),
        None => Ok(()),
    }
}
