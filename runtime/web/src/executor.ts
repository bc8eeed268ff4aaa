// The WebGPU executor: the browser twin of runtime/src/gpu.rs. It reads the same
// `artifact.json` (format slmc-gpu-1), makes the same checks, creates the same buffers,
// pipelines and bind groups, and runs the same dispatch schedule once per step; the greedy
// pick runs on the GPU and only the token id comes back.

const ARTIFACT_FILE = "artifact.json";
const GPU_ARTIFACT_FORMAT = "slmc-gpu-1";
/** WebGPU's `maxComputeWorkgroupsPerDimension` default, which every adapter offers. */
const MAX_WORKGROUPS_PER_DIMENSION = 65535;
/** Optional features the kernels may use, by their WebGPU names. */
const KNOWN_FEATURES = ["shader-f16", "subgroups"];

/** `ceil((per_token * s + constant) / divisor)`. */
interface Count {
  per_token: number;
  constant: number;
  divisor: number;
}

interface Dispatch {
  value: string;
  kernel: number;
  bindings: number[];
  workgroups: [Count, Count, Count];
}

type BufferKind =
  | { type: "weight"; offset: number; layout: string }
  | { type: "table"; offset: number }
  | { type: "activation" | "cache" | "input" };

export interface ModelInfo {
  name: string;
  vocab_size: number;
  eos_token_ids: number[];
  context_len: number;
  max_step_tokens: number;
}

interface GpuArtifact {
  format: string;
  target: string;
  required_features?: string[];
  model: ModelInfo;
  buffers: { name: string; kind: BufferKind; bytes: number }[];
  kernels: { name: string; entry_point: string; storage_bindings: number }[];
  dispatches: Dispatch[];
  tokens_buffer: number;
  logits_buffer: number;
  argmax_dispatch: Dispatch;
  next_token_buffer: number;
  weights_file: string;
  files?: { path: string; bytes: number; sha256: string }[];
}

export class ArtifactError extends Error {
  constructor(
    readonly file: string,
    message: string,
  ) {
    super(`${file}: ${message}`);
  }
}

function evalCount(c: Count, tokens: number): number {
  return Math.ceil((c.per_token * tokens + c.constant) / Math.max(c.divisor, 1));
}

function kernelFile(name: string): string {
  return `kernels/${name}.wgsl`;
}

/** Reads and checks the manifest against the verified files, as `load_artifact` does. */
function loadArtifact(files: Map<string, Uint8Array<ArrayBuffer>>, digests: Map<string, string>): GpuArtifact {
  const raw = files.get(ARTIFACT_FILE);
  if (!raw) throw new ArtifactError(ARTIFACT_FILE, "missing: this bundle has no GPU artifact");
  let a: GpuArtifact;
  try {
    a = JSON.parse(new TextDecoder().decode(raw));
  } catch (e) {
    throw new ArtifactError(ARTIFACT_FILE, `invalid artifact manifest: ${e}`);
  }
  const fail = (message: string, file = ARTIFACT_FILE) => new ArtifactError(file, message);
  if (a.format !== GPU_ARTIFACT_FORMAT) {
    throw fail(`format \`${a.format}\` is not ${GPU_ARTIFACT_FORMAT} (this page runs webgpu bundles)`);
  }
  // The artifact's own file list must agree with what the bundle manifest verified.
  for (const f of a.files ?? []) {
    if (digests.get(f.path) !== f.sha256) throw fail(`lists \`${f.path}\` with a digest the bundle does not have`, f.path);
  }
  const weights = files.get(a.weights_file);
  if (!weights) throw fail(`weights file \`${a.weights_file}\` is not in the bundle`);
  for (const b of a.buffers) {
    if ((b.kind.type === "weight" || b.kind.type === "table") && b.kind.offset + b.bytes > weights.length) {
      throw fail(
        `buffer \`${b.name}\` (${b.bytes} bytes at ${b.kind.offset}) runs past the end of the file (${weights.length} bytes)`,
        a.weights_file,
      );
    }
  }
  for (const d of [...a.dispatches, a.argmax_dispatch]) {
    const counts = d.workgroups.map((c) => evalCount(c, a.model.max_step_tokens));
    if (counts.some((c) => c > MAX_WORKGROUPS_PER_DIMENSION)) {
      throw fail(`dispatch \`${d.value}\` needs [${counts}] workgroups at the largest step (limit ${MAX_WORKGROUPS_PER_DIMENSION})`);
    }
    const kernel = a.kernels[d.kernel];
    if (!kernel) throw fail(`dispatch \`${d.value}\` names kernel ${d.kernel}`);
    if (d.bindings.length !== kernel.storage_bindings || d.bindings.some((b) => b >= a.buffers.length)) {
      throw fail(`dispatch \`${d.value}\` has bad bindings`);
    }
  }
  for (const k of a.kernels) {
    if (k.name.includes("/") || k.name.includes("..")) throw fail(`kernel name \`${k.name}\` lies outside kernels/`);
    if (!files.has(kernelFile(k.name))) throw fail("missing from the bundle", kernelFile(k.name));
  }
  for (const name of a.required_features ?? []) {
    if (!KNOWN_FEATURES.includes(name)) throw fail(`unknown GPU feature \`${name}\``);
  }
  for (const i of [a.tokens_buffer, a.logits_buffer, a.next_token_buffer]) {
    if (!(i < a.buffers.length)) throw fail("tokens/logits/next-token buffer out of range");
  }
  const m = a.model;
  if (m.vocab_size === 0 || m.vocab_size * m.max_step_tokens * 4 > a.buffers[a.logits_buffer].bytes) {
    throw fail(
      `a vocabulary of ${m.vocab_size} over ${m.max_step_tokens} tokens a step does not fit the logits buffer of ${a.buffers[a.logits_buffer].bytes} bytes`,
    );
  }
  return a;
}

export class WebGpuExecutor {
  private past = 0;
  /** The first error the device reported outside an error scope. */
  private uncaptured: string | null = null;

  private constructor(
    readonly artifact: GpuArtifact,
    readonly adapterInfo: string,
    private readonly device: GPUDevice,
    private readonly buffers: GPUBuffer[],
    private readonly pipelines: GPUComputePipeline[],
    private readonly bindGroups: GPUBindGroup[],
    private readonly argmaxBindGroup: GPUBindGroup,
    private readonly uniform: GPUBuffer,
    private readonly tokenReadback: GPUBuffer,
  ) {
    device.addEventListener("uncapturederror", (e) => {
      this.uncaptured ??= (e as GPUUncapturedErrorEvent).error.message;
    });
  }

  /** `digests`: path -> sha256 of every file the bundle manifest verified. */
  static async load(files: Map<string, Uint8Array<ArrayBuffer>>, digests: Map<string, string>): Promise<WebGpuExecutor> {
    const artifact = loadArtifact(files, digests);
    const weights = files.get(artifact.weights_file)!;
    if (!navigator.gpu) throw new Error("this browser offers no WebGPU (navigator.gpu is missing)");
    const adapter = await navigator.gpu.requestAdapter();
    if (!adapter) throw new Error("no GPU adapter");
    const info = adapter.info;
    const adapterInfo = `${info.vendor} ${info.architecture} ${info.device} ${info.description}`.trim();
    const requiredFeatures: GPUFeatureName[] = [];
    for (const name of artifact.required_features ?? []) {
      if (!adapter.features.has(name)) {
        throw new Error(
          `the artifact's kernels use the GPU feature \`${name}\`, which adapter ${adapterInfo} does not offer; compile for a target without it (e.g. --target webgpu)`,
        );
      }
      requiredFeatures.push(name as GPUFeatureName);
    }
    // Ask for everything the adapter offers, as the native executor does.
    const requiredLimits: Record<string, number> = {};
    for (const key in adapter.limits) {
      const value = (adapter.limits as unknown as Record<string, unknown>)[key];
      if (typeof value === "number") requiredLimits[key] = value;
    }
    const device = await adapter.requestDevice({ label: "slmc", requiredFeatures, requiredLimits });
    const limits = device.limits;
    const largest = Math.max(0, ...artifact.buffers.map((b) => b.bytes));
    if (largest > limits.maxStorageBufferBindingSize || largest > limits.maxBufferSize) {
      throw new Error(
        `a buffer of ${largest} bytes exceeds the adapter's limits (binding ${limits.maxStorageBufferBindingSize}, buffer ${limits.maxBufferSize})`,
      );
    }
    device.pushErrorScope("out-of-memory");
    const buffers = artifact.buffers.map((b) => {
      const size = Math.ceil(b.bytes / 4) * 4;
      const buffer = device.createBuffer({
        label: b.name,
        size,
        usage: GPUBufferUsage.STORAGE | GPUBufferUsage.COPY_DST | GPUBufferUsage.COPY_SRC,
      });
      if (b.kind.type === "weight" || b.kind.type === "table") {
        const bytes = new Uint8Array(size);
        bytes.set(weights.subarray(b.kind.offset, b.kind.offset + b.bytes));
        device.queue.writeBuffer(buffer, 0, bytes);
      }
      return buffer;
    });
    const oom = await device.popErrorScope();
    if (oom) throw new Error(`allocating the artifact's buffers: ${oom.message}`);
    const uniform = device.createBuffer({ label: "step", size: 16, usage: GPUBufferUsage.UNIFORM | GPUBufferUsage.COPY_DST });
    const pipelines: GPUComputePipeline[] = [];
    for (const k of artifact.kernels) {
      const path = kernelFile(k.name);
      // Browsers' WGSL compiler (Tint) wants `enable subgroups;` before subgroup built-ins;
      // naga, which validated the kernels at compile time, refuses that directive, so the
      // files carry none and the page adds it for an artifact that requires the feature.
      let code = new TextDecoder().decode(files.get(path)!);
      if (requiredFeatures.includes("subgroups" as GPUFeatureName) && !/^\s*enable subgroups;/m.test(code)) {
        code = "enable subgroups;\n" + code;
      }
      device.pushErrorScope("validation");
      const module = device.createShaderModule({ label: k.name, code });
      const pipeline = device.createComputePipeline({ label: k.name, layout: "auto", compute: { module, entryPoint: k.entry_point } });
      const error = await device.popErrorScope();
      if (error) throw new ArtifactError(path, `the GPU rejected the kernel: ${error.message}`);
      pipelines.push(pipeline);
    }
    device.pushErrorScope("validation");
    const bindGroups = [...artifact.dispatches, artifact.argmax_dispatch].map((d) =>
      device.createBindGroup({
        label: d.value,
        layout: pipelines[d.kernel].getBindGroupLayout(0),
        entries: [
          { binding: 0, resource: { buffer: uniform } },
          ...d.bindings.map((b, i) => ({ binding: i + 1, resource: { buffer: buffers[b] } })),
        ],
      }),
    );
    const error = await device.popErrorScope();
    if (error) throw new Error(`binding the schedule: ${error.message}`);
    const argmaxBindGroup = bindGroups.pop()!;
    const tokenReadback = device.createBuffer({
      label: "next token readback",
      size: 4,
      usage: GPUBufferUsage.MAP_READ | GPUBufferUsage.COPY_DST,
    });
    return new WebGpuExecutor(
      artifact,
      adapterInfo,
      device,
      buffers,
      pipelines,
      bindGroups,
      argmaxBindGroup,
      uniform,
      tokenReadback,
    );
  }

  get model(): ModelInfo {
    return this.artifact.model;
  }

  get pastLength(): number {
    return this.past;
  }

  reset(): void {
    this.past = 0;
  }

  /** Records one step of at most `max_step_tokens` tokens (and, with `argmax`, the greedy
   * pick of its last row). */
  private encodeStep(tokens: number[], argmax: boolean): GPUCommandEncoder {
    const s = tokens.length;
    const queue = this.device.queue;
    queue.writeBuffer(this.buffers[this.artifact.tokens_buffer], 0, new Uint32Array(tokens));
    queue.writeBuffer(this.uniform, 0, new Uint32Array([s, this.past, 0, 0]));
    const encoder = this.device.createCommandEncoder({ label: "step" });
    const pass = encoder.beginComputePass({ label: "step" });
    const steps: [Dispatch, GPUBindGroup][] = this.artifact.dispatches.map((d, i) => [d, this.bindGroups[i]]);
    if (argmax) steps.push([this.artifact.argmax_dispatch, this.argmaxBindGroup]);
    for (const [d, group] of steps) {
      const [x, y, z] = d.workgroups.map((c) => evalCount(c, s));
      if (Math.max(x, y, z) > MAX_WORKGROUPS_PER_DIMENSION) {
        throw new Error(`dispatch \`${d.value}\` needs ${x}x${y}x${z} workgroups (limit ${MAX_WORKGROUPS_PER_DIMENSION})`);
      }
      if (x * y * z === 0) continue;
      pass.setPipeline(this.pipelines[d.kernel]);
      pass.setBindGroup(0, group);
      pass.dispatchWorkgroups(x, y, z);
    }
    pass.end();
    this.past += s;
    return encoder;
  }

  private checkStep(tokens: number[]): void {
    const m = this.artifact.model;
    if (tokens.length === 0) throw new Error("no tokens to feed");
    if (this.past + tokens.length > m.context_len) {
      throw new Error(
        `the KV cache holds ${this.past} positions; ${tokens.length} more would exceed the artifact's context of ${m.context_len}`,
      );
    }
    const bad = tokens.find((t) => !Number.isInteger(t) || t < 0 || t >= m.vocab_size);
    if (bad !== undefined) throw new Error(`token id ${bad} is outside the vocabulary of ${m.vocab_size}`);
  }

  /** Feeds `tokens` (in steps of at most `max_step_tokens`) and returns the greedy next token. */
  async nextToken(tokens: number[]): Promise<number> {
    this.checkStep(tokens);
    const step = Math.max(this.artifact.model.max_step_tokens, 1);
    for (let start = 0; start < tokens.length; start += step) {
      const chunk = tokens.slice(start, start + step);
      const last = start + step >= tokens.length;
      const encoder = this.encodeStep(chunk, last);
      if (last) {
        encoder.copyBufferToBuffer(this.buffers[this.artifact.next_token_buffer], 0, this.tokenReadback, 0, 4);
      }
      this.device.queue.submit([encoder.finish()]);
    }
    await this.tokenReadback.mapAsync(GPUMapMode.READ, 0, 4);
    const id = new Uint32Array(this.tokenReadback.getMappedRange(0, 4).slice(0))[0];
    this.tokenReadback.unmap();
    if (this.uncaptured) throw new Error(`the device reported an error running the schedule: ${this.uncaptured}`);
    return id;
  }
}
