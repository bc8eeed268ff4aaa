//! The wgpu executor: loads a GPU artifact (`artifact.json`, `kernels/*.wgsl`,
//! `weights.bin`), uploads weights, keeps the KV cache on the GPU and runs the dispatch
//! schedule once per step. Only logits cross back.

use std::path::{Path, PathBuf};

use slmc_targets::artifact::{BufferKind, GpuArtifact};
use slmc_targets::ArtifactKind;

use crate::files::{kernel_file, ArtifactFiles, ARTIFACT_FILE};
use crate::{ExecError, Executor};

#[derive(Debug, thiserror::Error)]
pub enum GpuExecError {
    #[error("{path}: {message}")]
    Artifact { path: PathBuf, message: String },
    #[error("no GPU adapter{0}")]
    NoAdapter(String),
    #[error("GPU device: {0}")]
    Device(String),
    #[error("GPU: {0}")]
    Gpu(String),
}

impl From<GpuExecError> for ExecError {
    fn from(e: GpuExecError) -> ExecError {
        ExecError::Usage(e.to_string())
    }
}

pub struct GpuExecutor {
    artifact: GpuArtifact,
    device: wgpu::Device,
    queue: wgpu::Queue,
    buffers: Vec<wgpu::Buffer>,
    pipelines: Vec<wgpu::ComputePipeline>,
    bind_groups: Vec<wgpu::BindGroup>,
    uniform: wgpu::Buffer,
    readback: wgpu::Buffer,
    token_readback: wgpu::Buffer,
    argmax_bind_group: wgpu::BindGroup,
    past: usize,
    /// The first error the device reported outside an error scope (wgpu's default handler
    /// would panic): the step that raised it, and every later one, fail with it.
    uncaptured: std::sync::Arc<std::sync::Mutex<Option<String>>>,
    pub adapter_info: String,
}

/// WebGPU's `maxComputeWorkgroupsPerDimension` default, which every adapter offers.
const MAX_WORKGROUPS_PER_DIMENSION: u64 = 65535;

fn artifact_err(path: &Path, message: impl Into<String>) -> GpuExecError {
    GpuExecError::Artifact { path: path.to_path_buf(), message: message.into() }
}

/// Loads and checks the manifest: every offset and size against `weights.bin`, every
/// binding against the buffer table, every kernel file present.
pub fn load_artifact(files: &ArtifactFiles) -> Result<GpuArtifact, GpuExecError> {
    let path = files.path(ARTIFACT_FILE);
    let artifact: GpuArtifact = crate::registry::read_manifest(files, ArtifactKind::Gpu)
        .map_err(|(file, message)| artifact_err(&file, message))?;
    // Artifacts before slmc 0.3 list nothing (their bundle's manifest covers the files).
    if !artifact.files.is_empty() {
        files.check_listed(&artifact.files).map_err(|(file, message)| artifact_err(&file, message))?;
    }
    // Everything the manifest names stays inside the artifact directory.
    if !slmc_targets::artifact::is_relative_inside(&artifact.weights_file) {
        return Err(artifact_err(&path, format!("weights file `{}` lies outside the artifact", artifact.weights_file)));
    }
    // Kernel names become `kernels/<name>.wgsl`: one path component.
    if let Some(k) =
        artifact.kernels.iter().find(|k| !slmc_targets::artifact::is_relative_inside(&k.name) || k.name.contains('/'))
    {
        return Err(artifact_err(&path, format!("kernel name `{}` lies outside kernels/", k.name)));
    }
    let weights = files.path(&artifact.weights_file);
    let len = files.bytes(&artifact.weights_file).map_err(|(file, message)| artifact_err(&file, message))?.len() as u64;
    for b in &artifact.buffers {
        if let BufferKind::Weight { offset, .. } | BufferKind::Table { offset } = b.kind {
            if offset.checked_add(b.bytes).is_none_or(|end| end > len) {
                return Err(artifact_err(
                    &weights,
                    format!(
                        "buffer `{}` ({} bytes at {offset}) runs past the end of the file ({len} bytes)",
                        b.name, b.bytes
                    ),
                ));
            }
        }
    }
    for d in artifact.dispatches.iter().chain([&artifact.argmax_dispatch]) {
        // The largest step's workgroup counts stay within WebGPU's per-dimension limit.
        let counts = d.workgroups.map(|c| c.eval(artifact.model.max_step_tokens as u64));
        if counts.iter().any(|c| *c > MAX_WORKGROUPS_PER_DIMENSION) {
            return Err(artifact_err(&path, format!("dispatch `{}` needs {counts:?} workgroups at the largest step (limit {MAX_WORKGROUPS_PER_DIMENSION})", d.value)));
        }
        let kernel = artifact
            .kernels
            .get(d.kernel)
            .ok_or_else(|| artifact_err(&path, format!("dispatch `{}` names kernel {}", d.value, d.kernel)))?;
        if d.bindings.len() != kernel.storage_bindings || d.bindings.iter().any(|b| *b >= artifact.buffers.len()) {
            return Err(artifact_err(&path, format!("dispatch `{}` has bad bindings", d.value)));
        }
    }
    for k in &artifact.kernels {
        files.text(&kernel_file(&k.name)).map_err(|(file, message)| artifact_err(&file, message))?;
    }
    for name in &artifact.required_features {
        if ![slmc_targets::FEATURE_SHADER_F16, slmc_targets::FEATURE_SUBGROUPS].contains(&name.as_str()) {
            return Err(artifact_err(&path, format!("unknown GPU feature `{name}`")));
        }
    }
    for idx in [artifact.tokens_buffer, artifact.logits_buffer, artifact.next_token_buffer] {
        if idx >= artifact.buffers.len() {
            return Err(artifact_err(&path, "tokens/logits/next-token buffer out of range"));
        }
    }
    // Reading back a step's logits must stay inside the logits buffer.
    let m = &artifact.model;
    let logits_needed = m.vocab_size.checked_mul(m.max_step_tokens).and_then(|n| n.checked_mul(4));
    if m.vocab_size == 0 || logits_needed.is_none_or(|n| n as u64 > artifact.buffers[artifact.logits_buffer].bytes) {
        return Err(artifact_err(
            &path,
            format!(
                "a vocabulary of {} over {} tokens a step does not fit the logits buffer of {} bytes",
                m.vocab_size, m.max_step_tokens, artifact.buffers[artifact.logits_buffer].bytes
            ),
        ));
    }
    Ok(artifact)
}

impl GpuExecutor {
    /// `adapter_filter`: a case-insensitive substring of the adapter name to pick
    /// (else `$SLMC_ADAPTER`, else the first adapter).
    pub fn load(files: &ArtifactFiles, adapter_filter: Option<&str>) -> Result<GpuExecutor, GpuExecError> {
        let artifact = load_artifact(files)?;
        let weights = files.bytes(&artifact.weights_file).map_err(|(file, message)| artifact_err(&file, message))?;

        // Compute needs no display: the native compute APIs only (Vulkan, Metal, DX12), unless
        // WGPU_BACKEND says otherwise. The GL backend would probe for a display server
        // (a Wayland socket) at start-up, which inference has no business touching.
        let mut descriptor = wgpu::InstanceDescriptor::new_without_display_handle_from_env();
        if std::env::var_os("WGPU_BACKEND").is_none() {
            descriptor.backends = wgpu::Backends::PRIMARY;
        }
        let backends = descriptor.backends;
        let instance = wgpu::Instance::new(descriptor);
        let adapters = pollster::block_on(instance.enumerate_adapters(backends));
        let filter = adapter_filter.map(str::to_string).or_else(|| std::env::var("SLMC_ADAPTER").ok());
        let adapter = adapters
            .into_iter()
            .find(|a| filter.as_ref().is_none_or(|f| a.get_info().name.to_lowercase().contains(&f.to_lowercase())))
            .ok_or_else(|| GpuExecError::NoAdapter(filter.map(|f| format!(" matching `{f}`")).unwrap_or_default()))?;
        let info = adapter.get_info();
        let adapter_info = format!(
            "{} ({:?}, {:?}, driver {} {})",
            info.name, info.backend, info.device_type, info.driver, info.driver_info
        );
        let limits = adapter.limits();
        let mut required_features = wgpu::Features::empty();
        for name in &artifact.required_features {
            let feature = match name.as_str() {
                slmc_targets::FEATURE_SHADER_F16 => wgpu::Features::SHADER_F16,
                slmc_targets::FEATURE_SUBGROUPS => wgpu::Features::SUBGROUP,
                other => {
                    return Err(artifact_err(&files.path(ARTIFACT_FILE), format!("unknown GPU feature `{other}`")))
                }
            };
            if !adapter.features().contains(feature) {
                return Err(GpuExecError::Device(format!(
                    "the artifact's kernels use the GPU feature `{name}`, which adapter {adapter_info} does not offer; compile for a target without it (e.g. --target webgpu)"
                )));
            }
            required_features |= feature;
        }
        let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
            label: Some("slmc"),
            required_limits: limits.clone(),
            required_features,
            ..Default::default()
        }))
        .map_err(|e| GpuExecError::Device(e.to_string()))?;
        let uncaptured = std::sync::Arc::new(std::sync::Mutex::new(None::<String>));
        let slot = uncaptured.clone();
        device.on_uncaptured_error(std::sync::Arc::new(move |e: wgpu::Error| {
            let mut first = slot.lock().unwrap_or_else(|p| p.into_inner());
            first.get_or_insert_with(|| e.to_string());
        }));

        let largest = artifact.buffers.iter().map(|b| b.bytes).max().unwrap_or(0);
        if largest > limits.max_storage_buffer_binding_size || largest > limits.max_buffer_size {
            return Err(GpuExecError::Device(format!(
                "a buffer of {largest} bytes exceeds the adapter's limits (binding {}, buffer {})",
                limits.max_storage_buffer_binding_size, limits.max_buffer_size
            )));
        }
        let mut buffers = Vec::with_capacity(artifact.buffers.len());
        for b in &artifact.buffers {
            let size = b.bytes.div_ceil(4) * 4;
            let buf = device.create_buffer(&wgpu::BufferDescriptor {
                label: Some(&b.name),
                size,
                usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST | wgpu::BufferUsages::COPY_SRC,
                mapped_at_creation: false,
            });
            if let BufferKind::Weight { offset, .. } | BufferKind::Table { offset } = b.kind {
                let mut bytes = weights[offset as usize..(offset + b.bytes) as usize].to_vec();
                bytes.resize(size as usize, 0);
                queue.write_buffer(&buf, 0, &bytes);
            }
            buffers.push(buf);
        }
        let uniform = device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("step"),
            size: 16,
            usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let logits_bytes = artifact.buffers[artifact.logits_buffer].bytes.div_ceil(4) * 4;
        let readback = device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("logits readback"),
            size: logits_bytes,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });

        let mut pipelines = Vec::with_capacity(artifact.kernels.len());
        for k in &artifact.kernels {
            let path = files.path(&kernel_file(&k.name));
            let src = files.text(&kernel_file(&k.name)).map_err(|(file, message)| artifact_err(&file, message))?;
            let scope = device.push_error_scope(wgpu::ErrorFilter::Validation);
            let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
                label: Some(&k.name),
                source: wgpu::ShaderSource::Wgsl(src.into()),
            });
            let pipeline = device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                label: Some(&k.name),
                layout: None,
                module: &module,
                entry_point: Some(&k.entry_point),
                compilation_options: Default::default(),
                cache: None,
            });
            if let Some(e) = pollster::block_on(scope.pop()) {
                return Err(artifact_err(&path, format!("the GPU rejected the kernel: {e}")));
            }
            pipelines.push(pipeline);
        }
        let mut bind_groups = Vec::with_capacity(artifact.dispatches.len());
        let scope = device.push_error_scope(wgpu::ErrorFilter::Validation);
        for d in artifact.dispatches.iter().chain([&artifact.argmax_dispatch]) {
            let layout = pipelines[d.kernel].get_bind_group_layout(0);
            let mut entries = vec![wgpu::BindGroupEntry { binding: 0, resource: uniform.as_entire_binding() }];
            for (i, b) in d.bindings.iter().enumerate() {
                entries.push(wgpu::BindGroupEntry { binding: i as u32 + 1, resource: buffers[*b].as_entire_binding() });
            }
            bind_groups.push(device.create_bind_group(&wgpu::BindGroupDescriptor {
                label: Some(&d.value),
                layout: &layout,
                entries: &entries,
            }));
        }
        if let Some(e) = pollster::block_on(scope.pop()) {
            return Err(GpuExecError::Gpu(format!("binding the schedule: {e}")));
        }
        let argmax_bind_group = bind_groups.pop().expect("the argmax dispatch was bound last");
        let token_readback = device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("next token readback"),
            size: 4,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        Ok(GpuExecutor {
            artifact,
            device,
            queue,
            buffers,
            pipelines,
            bind_groups,
            uniform,
            readback,
            token_readback,
            argmax_bind_group,
            past: 0,
            uncaptured,
            adapter_info,
        })
    }

    pub fn artifact(&self) -> &GpuArtifact {
        &self.artifact
    }

    /// Records one step of at most `max_step_tokens` tokens (and, with `argmax`, the
    /// greedy pick of its last row) into a new encoder.
    fn encode_step(&mut self, tokens: &[u32], argmax: bool) -> Result<wgpu::CommandEncoder, GpuExecError> {
        let s = tokens.len();
        let words: Vec<u8> = tokens.iter().flat_map(|t| t.to_le_bytes()).collect();
        self.queue.write_buffer(&self.buffers[self.artifact.tokens_buffer], 0, &words);
        let step: Vec<u8> = [s as u32, self.past as u32, 0, 0].iter().flat_map(|v| v.to_le_bytes()).collect();
        self.queue.write_buffer(&self.uniform, 0, &step);
        let mut encoder = self.device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("step") });
        {
            let mut pass = encoder
                .begin_compute_pass(&wgpu::ComputePassDescriptor { label: Some("step"), timestamp_writes: None });
            let argmax_step = argmax.then_some((&self.artifact.argmax_dispatch, &self.argmax_bind_group));
            for (d, bg) in self.artifact.dispatches.iter().zip(&self.bind_groups).chain(argmax_step) {
                let [x, y, z] = d.workgroups.map(|c| c.eval(s as u64));
                if x.max(y).max(z) > MAX_WORKGROUPS_PER_DIMENSION {
                    return Err(GpuExecError::Gpu(format!(
                        "dispatch `{}` needs {x}x{y}x{z} workgroups (limit {MAX_WORKGROUPS_PER_DIMENSION})",
                        d.value
                    )));
                }
                if x * y * z == 0 {
                    continue;
                }
                pass.set_pipeline(&self.pipelines[d.kernel]);
                pass.set_bind_group(0, bg, &[]);
                pass.dispatch_workgroups(x as u32, y as u32, z as u32);
            }
        }
        self.past += s;
        Ok(encoder)
    }

    /// Submits, waits, and copies the first `bytes` of the mapped `readback` out.
    fn read_back(
        &self,
        encoder: wgpu::CommandEncoder,
        readback: &wgpu::Buffer,
        bytes: u64,
    ) -> Result<Vec<u8>, GpuExecError> {
        self.queue.submit([encoder.finish()]);
        let slice = readback.slice(..bytes);
        let (tx, rx) = std::sync::mpsc::channel();
        slice.map_async(wgpu::MapMode::Read, move |r| {
            let _ = tx.send(r);
        });
        self.device.poll(wgpu::PollType::wait_indefinitely()).map_err(|e| GpuExecError::Gpu(e.to_string()))?;
        if let Some(e) = self.uncaptured.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
            return Err(GpuExecError::Gpu(format!("the device reported an error running the schedule: {e}")));
        }
        rx.recv().map_err(|e| GpuExecError::Gpu(e.to_string()))?.map_err(|e| GpuExecError::Gpu(e.to_string()))?;
        let out = slice.get_mapped_range().map_err(|e| GpuExecError::Gpu(e.to_string()))?.to_vec();
        readback.unmap();
        Ok(out)
    }

    /// One step returning the logits of every token.
    fn step(&mut self, tokens: &[u32]) -> Result<Vec<f32>, GpuExecError> {
        let bytes = (tokens.len() * self.artifact.model.vocab_size * 4) as u64;
        let mut encoder = self.encode_step(tokens, false)?;
        encoder.copy_buffer_to_buffer(&self.buffers[self.artifact.logits_buffer], 0, &self.readback, 0, bytes);
        let raw = self.read_back(encoder, &self.readback, bytes)?;
        Ok(raw.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
    }

    fn check_step(&self, tokens: &[u32]) -> Result<(), ExecError> {
        let model = &self.artifact.model;
        if tokens.is_empty() {
            return Err(ExecError::Usage("no tokens to feed".into()));
        }
        if self.past + tokens.len() > model.context_len {
            return Err(ExecError::Usage(format!(
                "the KV cache holds {} positions; {} more would exceed the artifact's context of {}",
                self.past,
                tokens.len(),
                model.context_len
            )));
        }
        if let Some(bad) = tokens.iter().find(|t| **t as usize >= model.vocab_size) {
            return Err(ExecError::Usage(format!("token id {bad} is outside the vocabulary of {}", model.vocab_size)));
        }
        Ok(())
    }
}

impl Executor for GpuExecutor {
    fn vocab_size(&self) -> usize {
        self.artifact.model.vocab_size
    }

    fn forward(&mut self, tokens: &[u32]) -> Result<Vec<f32>, ExecError> {
        self.check_step(tokens)?;
        let mut out = Vec::with_capacity(tokens.len() * self.artifact.model.vocab_size);
        for chunk in tokens.chunks(self.artifact.model.max_step_tokens.max(1)) {
            out.extend(self.step(chunk)?);
        }
        Ok(out)
    }

    /// The argmax runs on the GPU; only the token id is read back.
    fn next_token(&mut self, tokens: &[u32]) -> Result<u32, ExecError> {
        self.check_step(tokens)?;
        let chunks: Vec<&[u32]> = tokens.chunks(self.artifact.model.max_step_tokens.max(1)).collect();
        let (last, earlier) = chunks.split_last().expect("check_step refuses no tokens");
        for chunk in earlier {
            let encoder = self.encode_step(chunk, false)?;
            self.queue.submit([encoder.finish()]);
        }
        let mut encoder = self.encode_step(last, true)?;
        encoder.copy_buffer_to_buffer(&self.buffers[self.artifact.next_token_buffer], 0, &self.token_readback, 0, 4);
        let raw = self.read_back(encoder, &self.token_readback, 4)?;
        Ok(u32::from_le_bytes([raw[0], raw[1], raw[2], raw[3]]))
    }

    fn reset(&mut self) {
        self.past = 0;
    }

    fn past_len(&self) -> usize {
        self.past
    }
}
