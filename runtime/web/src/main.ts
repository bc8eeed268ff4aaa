// The page: verifies the bundle `slmc serve --web` points it at, opens the WebGPU executor,
// tokenizes the prompt with the bundle's own tokenizer.json (and chat template), and streams
// greedy tokens into the page. Nothing leaves the page.
//
// Query parameters (for scripted runs): `prompt`, `ids` (comma-separated token ids instead of
// a prompt), `chat=1` (wrap the prompt as a user message in the chat template),
// `max_tokens`, `run=1` (start at once). The outcome is also published as
// `window.slmcResult` and logged as one `SLMC_RESULT {json}` console line.

import { Template } from "@huggingface/jinja";
import { Tokenizer } from "@huggingface/tokenizers";

import { BundleError, Trust, verifyBundle, VerifiedBundle } from "./bundle";
import { WebGpuExecutor } from "./executor";

interface PageConfig {
  /** The bundle's URL (ends with `/`). */
  bundle: string;
  public_key: string | null;
  allow_unsigned: boolean;
}

interface RunResult {
  ok: boolean;
  error?: string;
  model?: string;
  adapter?: string;
  signature_checked?: boolean;
  files_verified?: number;
  prompt_ids?: number[];
  generated_ids?: number[];
  finish_reason?: string;
  text?: string;
  load_s?: number;
  ttft_s?: number;
  decode_tokens_per_s?: number;
}

declare global {
  interface Window {
    slmcResult?: RunResult;
  }
}

const $ = <T extends HTMLElement>(id: string) => document.getElementById(id) as T;

function status(line: string, kind: "info" | "ok" | "error" = "info"): void {
  const li = document.createElement("li");
  li.textContent = line;
  li.className = kind;
  $("status").appendChild(li);
}

function finish(result: RunResult): void {
  window.slmcResult = result;
  console.log("SLMC_RESULT " + JSON.stringify(result));
}

class TextModel {
  private constructor(
    readonly tokenizer: Tokenizer | null,
    private readonly config: Record<string, unknown>,
  ) {}

  static open(bundle: VerifiedBundle): TextModel {
    const json = (path: string) => {
      const bytes = bundle.files.get(path);
      return bytes ? JSON.parse(new TextDecoder().decode(bytes)) : null;
    };
    const tokenizerJson = json("tokenizer.json");
    const config = json("tokenizer_config.json") ?? {};
    return new TextModel(tokenizerJson ? new Tokenizer(tokenizerJson, config) : null, config);
  }

  /** The prompt as transformers' `apply_chat_template(..., add_generation_prompt=True)` renders it. */
  chat(prompt: string): string {
    const template = this.config["chat_template"];
    if (typeof template !== "string") throw new Error("tokenizer_config.json: the bundle has no chat template");
    const special = (key: string) => {
      const v = this.config[key];
      return typeof v === "string" ? v : ((v as { content?: string } | null)?.content ?? "");
    };
    return new Template(template).render({
      messages: [{ role: "user", content: prompt }],
      add_generation_prompt: true,
      bos_token: special("bos_token"),
      eos_token: special("eos_token"),
    });
  }

  encode(text: string): number[] {
    if (!this.tokenizer) throw new Error("the bundle has no tokenizer.json: give token ids instead");
    return this.tokenizer.encode(text).ids;
  }

  decode(ids: number[]): string {
    return this.tokenizer ? this.tokenizer.decode(ids, { skip_special_tokens: true }) : ids.join(" ");
  }
}

let session: Promise<{ bundle: VerifiedBundle; executor: WebGpuExecutor; text: TextModel }> | null = null;

async function open(config: PageConfig) {
  const trust: Trust = { publicKey: config.public_key, allowUnsigned: config.allow_unsigned };
  const progress = $<HTMLProgressElement>("progress");
  const bundle = await verifyBundle(new URL(config.bundle, location.href).href, trust, (done, total) => {
    progress.max = total;
    progress.value = done;
  });
  status(
    `${bundle.manifest.files.length} files (${(bundle.totalBytes / 1e6).toFixed(1)} MB) match the manifest's sha256; ` +
      (bundle.signatureChecked ? "signature checked" : "signature NOT checked (no public key configured)"),
    bundle.signatureChecked ? "ok" : "info",
  );
  const digests = new Map(bundle.manifest.files.map((f) => [f.path, f.sha256]));
  const executor = await WebGpuExecutor.load(bundle.files, digests);
  status(`${bundle.manifest.model.name} for ${bundle.manifest.target.name} on ${executor.adapterInfo}`, "ok");
  return { bundle, executor, text: TextModel.open(bundle) };
}

async function run(config: PageConfig, params: URLSearchParams): Promise<RunResult> {
  const started = performance.now();
  session ??= open(config);
  const { bundle, executor, text } = await session;
  const loadS = (performance.now() - started) / 1000;
  const idsParam = params.get("ids");
  const promptText = $<HTMLTextAreaElement>("prompt").value;
  const promptIds = idsParam
    ? idsParam.split(",").map((s) => Number(s.trim()))
    : text.encode($<HTMLInputElement>("chat").checked ? text.chat(promptText) : promptText);
  const maxTokens = Number($<HTMLInputElement>("max-tokens").value) || 32;
  const model = executor.model;
  const out = $("output");
  out.textContent = "";
  executor.reset();
  const generated: number[] = [];
  let feed = promptIds;
  const t0 = performance.now();
  let ttft = 0;
  // As the native generate loop: stop at an end-of-sequence token, at the token limit, or
  // when the cache cannot take the next token.
  let finishReason = "length";
  while (generated.length < maxTokens) {
    if (generated.length > 0 && executor.pastLength + feed.length > model.context_len) {
      finishReason = "context_full";
      break;
    }
    const next = await executor.nextToken(feed);
    if (generated.length === 0) ttft = (performance.now() - t0) / 1000;
    generated.push(next);
    out.textContent = text.decode(generated);
    if (model.eos_token_ids.includes(next)) {
      finishReason = "eos";
      break;
    }
    feed = [next];
  }
  const decodeS = (performance.now() - t0) / 1000 - ttft;
  status(
    `${promptIds.length} prompt tokens, ${generated.length} generated (${finishReason}); first token ${ttft.toFixed(2)} s` +
      (generated.length > 1 ? `, then ${((generated.length - 1) / decodeS).toFixed(1)} tokens/s` : ""),
    "ok",
  );
  return {
    ok: true,
    model: bundle.manifest.model.name,
    adapter: executor.adapterInfo,
    signature_checked: bundle.signatureChecked,
    files_verified: bundle.manifest.files.length,
    prompt_ids: promptIds,
    generated_ids: generated,
    finish_reason: finishReason,
    text: text.decode(generated),
    load_s: loadS,
    ttft_s: ttft,
    decode_tokens_per_s: generated.length > 1 ? (generated.length - 1) / decodeS : undefined,
  };
}

async function start(): Promise<void> {
  const params = new URLSearchParams(location.search);
  let config: PageConfig;
  try {
    config = await (await fetch("web-config.json", { cache: "no-store" })).json();
  } catch (e) {
    status(`web-config.json: cannot read the page's configuration: ${e}`, "error");
    finish({ ok: false, error: `web-config.json: ${e}` });
    return;
  }
  $<HTMLTextAreaElement>("prompt").value = params.get("prompt") ?? "The capital of France is";
  $<HTMLInputElement>("chat").checked = params.get("chat") === "1";
  $<HTMLInputElement>("max-tokens").value = params.get("max_tokens") ?? "32";
  const button = $<HTMLButtonElement>("run");
  const go = async () => {
    button.disabled = true;
    try {
      finish(await run(config, params));
    } catch (e) {
      const message = e instanceof Error ? e.message : String(e);
      status(e instanceof BundleError ? `refused: ${message}` : `error: ${message}`, "error");
      session = null;
      finish({ ok: false, error: message });
    } finally {
      button.disabled = false;
    }
  };
  button.addEventListener("click", go);
  if (params.get("run") === "1") await go();
}

start();
