//! The `slmc` command line. Every command takes `--json` for pipelines; errors go to
//! stderr (and, with `--json`, as `{"error": ...}` to stdout) with a non-zero exit.

use std::process::ExitCode;

use anyhow::{anyhow, bail, Context, Result};
use clap::Parser;
use serde_json::{json, Value};
use slmc_compiler::import::{self, Model};
use slmc_compiler::{convert, default_model_path, lower};
use slmc_ir::DType;
use slmc_ir::Layered;

mod cli;

use cli::args::*;
use cli::info::{inspect, targets_command};
use cli::opt::*;
use cli::run::*;
use slmc_runtime::{score_with, InterpreterExecutor};

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
        Command::Eval { common, .. } | Command::Install { common, .. } => common.json,
        Command::Bench(args) => args.json,
        Command::Serve(args) => args.common.json,
        Command::Cat { json, .. }
        | Command::Targets { json, .. }
        | Command::Keygen { json, .. }
        | Command::Sign { json, .. }
        | Command::Verify { json, .. }
        | Command::Rollback { json, .. } => *json,
    };
    match dispatch(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        // The answer (the abstention) is printed already; the status says which it was.
        Err(e) if e.downcast_ref::<cli::run::Abstained>().is_some() => ExitCode::from(cli::run::ABSTAINED_EXIT),
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

fn dispatch(command: Command) -> Result<()> {
    match command {
        Command::Targets { action, json } => targets_command(action, json),
        Command::Keygen { out, force, json } => cli::bundle::keygen(&out, force, json),
        Command::Sign { bundle, key, json } => cli::bundle::sign(&bundle, &key, json),
        Command::Verify { bundle, trust, json } => cli::bundle::verify(&bundle, &trust, json),
        Command::Eval { common, run, calibrate } => cli::bundle::eval(&common, &run, calibrate),
        Command::Install { common, run, store } => cli::bundle::install(&common, &run, &store),
        Command::Rollback { store, json } => cli::bundle::rollback(&store, json),
        Command::Bench(args) => cli::bench::bench(&args),
        Command::Serve(args) => cli::serve::serve(&args),
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
        Command::Run { common, run: exec, prompt, generation, opt } => run(&common, &exec, &prompt, &generation, &opt),
        Command::Opt { common, opt, emit } => opt_command(&common, &opt, emit),
        Command::Compile { common, opt, args } => cli::bundle::compile_command(&common, opt, args),
        Command::Quality { common, opt, prompts, max_quality_drop } => {
            quality_command(&common, &opt, prompts.as_deref(), max_quality_drop)
        }
        Command::Score { common, run: exec, prompt_ids, continuation_ids, decode, opt } => {
            let s = match artifact_executor(&common, &exec, &opt)? {
                Some(mut loaded) => score_with(loaded.exec.as_mut(), &prompt_ids, &continuation_ids, decode)?,
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
