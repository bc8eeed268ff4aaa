//! Each MIL operation's semantics (the subset slmc's emitter writes).

use std::collections::HashMap;
use std::rc::Rc;

use slmc_targets::coreml::{Dt, MilOp};

use super::{strides, Arg, MilError, Step, Tensor};

pub(super) fn run_step(
    step: &Step,
    env: &HashMap<String, Rc<Tensor>>,
    consts: &HashMap<String, Tensor>,
    states: &mut HashMap<String, Rc<Tensor>>,
) -> Result<Vec<Rc<Tensor>>, MilError> {
    let err = |m: String| MilError::Op { op: step.ty.name().to_string(), name: step.name.clone(), message: m };
    let resolve = |a: &Arg| -> Result<Tensor, MilError> {
        match a {
            Arg::Literal(t) => Ok(t.clone()),
            Arg::Name(n) => env
                .get(n)
                .map(|t| (**t).clone())
                .or_else(|| consts.get(n).cloned())
                .ok_or_else(|| err(format!("`{n}` is not defined before its use"))),
        }
    };
    // Inputs by reference where they may be large weights.
    let get_ref = |k: &str| -> Result<&Tensor, MilError> {
        match step.inputs.get(k).and_then(|l| l.first()) {
            Some(Arg::Name(n)) => env
                .get(n)
                .map(|t| &**t)
                .or_else(|| consts.get(n))
                .ok_or_else(|| err(format!("`{n}` is not defined before its use"))),
            Some(Arg::Literal(t)) => Ok(t),
            None => Err(err(format!("missing input `{k}`"))),
        }
    };
    let get = |k: &str| -> Result<Tensor, MilError> {
        step.inputs.get(k).and_then(|l| l.first()).ok_or_else(|| err(format!("missing input `{k}`"))).and_then(resolve)
    };
    let opt = |k: &str| -> Result<Option<Tensor>, MilError> {
        step.inputs.get(k).and_then(|l| l.first()).map(resolve).transpose()
    };
    // An input that must name a value (states, and what is written into them).
    let name_input = |k: &str| -> Result<&String, MilError> {
        match step.inputs.get(k).and_then(|l| l.first()) {
            Some(Arg::Name(n)) => Ok(n),
            _ => Err(err(format!("input `{k}` must name a state or a computed value"))),
        }
    };
    let ints = |t: &Tensor| -> Vec<i64> { t.data.iter().map(|v| *v as i64).collect() };
    let axis_of = |a: i64, rank: usize| -> Result<usize, MilError> {
        let r = rank as i64;
        let v = if a < 0 { a + r } else { a };
        if v < 0 || v >= r {
            return Err(err(format!("axis {a} out of range for rank {rank}")));
        }
        Ok(v as usize)
    };
    let odt = step.outputs.first().map(|(_, d, _)| *d).unwrap_or(Dt::F16);
    let out = |data: Vec<f32>, shape: Vec<usize>| Tensor { dt: odt, shape, data };
    Ok(vec![Rc::new(match step.ty {
        MilOp::Add | MilOp::Sub | MilOp::Mul | MilOp::RealDiv | MilOp::Maximum => {
            let (x, y) = (get_ref("x")?, get_ref("y")?);
            let f: fn(f32, f32) -> f32 = match step.ty {
                MilOp::Add => |a, b| a + b,
                MilOp::Sub => |a, b| a - b,
                MilOp::Mul => |a, b| a * b,
                MilOp::RealDiv => |a, b| a / b,
                _ => f32::max,
            };
            broadcast_binary(x, y, f).map_err(err)?
        }
        // The declared result type decides the rounding (fp16) or none (fp32).
        MilOp::Cast => {
            let x = get_ref("x")?;
            out(x.data.clone(), x.shape.clone())
        }
        MilOp::Abs | MilOp::Rsqrt | MilOp::Silu | MilOp::Sigmoid | MilOp::Tanh => {
            let x = get_ref("x")?;
            let f: fn(f32) -> f32 = match step.ty {
                MilOp::Abs => f32::abs,
                // MIL's default epsilon is 1e-12.
                MilOp::Rsqrt => |v| 1.0 / (v + 1e-12).sqrt(),
                MilOp::Silu => |v| v / (1.0 + (-v).exp()),
                MilOp::Tanh => f32::tanh,
                _ => |v| 1.0 / (1.0 + (-v).exp()),
            };
            out(x.data.iter().map(|v| f(*v)).collect(), x.shape.clone())
        }
        MilOp::ReduceMax | MilOp::ReduceMean => {
            let x = get_ref("x")?;
            let axes = ints(&get("axes")?);
            let keep = opt("keep_dims")?.map(|t| t.data[0] != 0.0).unwrap_or(false);
            if axes.len() != 1 || axis_of(axes[0], x.shape.len())? != x.shape.len() - 1 || !keep {
                return Err(err("only a reduction over the last axis with keep_dims is implemented".into()));
            }
            let d = *x.shape.last().unwrap();
            let data = x
                .data
                .chunks(d)
                .map(|r| {
                    if step.ty == MilOp::ReduceMax {
                        r.iter().copied().fold(f32::NEG_INFINITY, f32::max)
                    } else {
                        r.iter().sum::<f32>() / d as f32
                    }
                })
                .collect();
            let mut shape = x.shape.clone();
            *shape.last_mut().unwrap() = 1;
            out(data, shape)
        }
        MilOp::Softmax => {
            let x = get_ref("x")?;
            let axis = axis_of(ints(&get("axis")?)[0], x.shape.len())?;
            if axis != x.shape.len() - 1 {
                return Err(err("only softmax over the last axis is implemented".into()));
            }
            let d = *x.shape.last().unwrap();
            let mut data = x.data.clone();
            for r in data.chunks_mut(d) {
                softmax(r);
            }
            out(data, x.shape.clone())
        }
        MilOp::Reshape => {
            let x = get("x")?;
            let shape: Vec<usize> = ints(&get("shape")?).iter().map(|v| *v as usize).collect();
            if shape.iter().product::<usize>() != x.data.len() {
                return Err(err(format!("cannot reshape {:?} to {shape:?}", x.shape)));
            }
            out(x.data, shape)
        }
        MilOp::Transpose => {
            let x = get_ref("x")?;
            let perm: Vec<usize> = ints(&get("perm")?).iter().map(|v| *v as usize).collect();
            transpose(x, &perm).map_err(err)?
        }
        MilOp::SliceByIndex => {
            let x = get_ref("x")?;
            let (begin, end) = (ints(&get("begin")?), ints(&get("end")?));
            let (region, shape) =
                slice_region(&x.shape, &begin, &end, &step_masks(&opt, x.shape.len())?).map_err(err)?;
            let data = gather_region(x, &region);
            out(data, shape)
        }
        MilOp::SliceUpdate => {
            let mut x = get("x")?;
            let update = get_ref("update")?;
            let (begin, end) = (ints(&get("begin")?), ints(&get("end")?));
            let (region, shape) =
                slice_region(&x.shape, &begin, &end, &step_masks(&opt, x.shape.len())?).map_err(err)?;
            if shape.iter().product::<usize>() != update.data.len() {
                return Err(err(format!("update {:?} does not fill the slice {shape:?}", update.shape)));
            }
            scatter_region(&mut x, &region, &update.data);
            x
        }
        MilOp::Concat => {
            let parts = step
                .inputs
                .get("values")
                .ok_or_else(|| err("missing `values`".into()))?
                .iter()
                .map(resolve)
                .collect::<Result<Vec<_>, _>>()?;
            let axis = axis_of(ints(&get("axis")?)[0], parts[0].shape.len())?;
            if opt("interleave")?.is_some_and(|t| t.data[0] != 0.0) {
                return Err(err("interleaved concat is not implemented".into()));
            }
            concat(&parts, axis).map_err(err)?
        }
        MilOp::Tile => {
            let x = get_ref("x")?;
            let reps: Vec<usize> = ints(&get("reps")?).iter().map(|v| *v as usize).collect();
            tile(x, &reps).map_err(err)?
        }
        MilOp::Gather => {
            let x = get_ref("x")?;
            let idx = get_ref("indices")?;
            let axis = axis_of(opt("axis")?.map(|t| t.data[0] as i64).unwrap_or(0), x.shape.len())?;
            if axis != 0 {
                return Err(err("only gather on axis 0 is implemented".into()));
            }
            let row: usize = x.shape[1..].iter().product();
            let mut data = Vec::with_capacity(idx.data.len() * row);
            for v in &idx.data {
                let i = *v as i64;
                let i = if i < 0 { i + x.shape[0] as i64 } else { i };
                if i < 0 || i as usize >= x.shape[0] {
                    return Err(err(format!("index {v} outside 0..{}", x.shape[0])));
                }
                data.extend_from_slice(&x.data[i as usize * row..(i as usize + 1) * row]);
            }
            let mut shape = idx.shape.clone();
            shape.extend_from_slice(&x.shape[1..]);
            out(data, shape)
        }
        MilOp::Linear => {
            let x = get_ref("x")?;
            let w = get_ref("weight")?;
            let k = *x.shape.last().unwrap();
            if w.shape.len() != 2 || w.shape[1] != k {
                return Err(err(format!("x {:?} and weight {:?} do not match", x.shape, w.shape)));
            }
            let n = w.shape[0];
            let m = x.data.len() / k;
            let mut y = slmc_ir::interp::matmul_transposed(&x.data, m, k, &w.data, n);
            if let Some(b) = opt("bias")? {
                for r in y.chunks_mut(n) {
                    for (v, bb) in r.iter_mut().zip(&b.data) {
                        *v += bb;
                    }
                }
            }
            let mut shape = x.shape.clone();
            *shape.last_mut().unwrap() = n;
            out(y, shape)
        }
        MilOp::Matmul => {
            let (x, y) = (get_ref("x")?, get_ref("y")?);
            let tx = opt("transpose_x")?.is_some_and(|t| t.data[0] != 0.0);
            let ty = opt("transpose_y")?.is_some_and(|t| t.data[0] != 0.0);
            batched_matmul(x, y, tx, ty, 1.0, None).map_err(err)?
        }
        MilOp::ScaledDotProductAttention => {
            let (q, k, v) = (get_ref("query")?, get_ref("key")?, get_ref("value")?);
            let mask = opt("attn_mask")?;
            let e = *q.shape.last().unwrap();
            let scores = batched_matmul(q, k, false, true, 1.0 / (e as f32).sqrt(), mask.as_ref()).map_err(err)?;
            let s = *scores.shape.last().unwrap();
            let mut probs = scores;
            for r in probs.data.chunks_mut(s) {
                softmax(r);
            }
            batched_matmul(&probs, v, false, false, 1.0, None).map_err(err)?
        }
        MilOp::ReadState => {
            let n = name_input("input")?;
            return Ok(vec![states.get(n).cloned().ok_or_else(|| err(format!("`{n}` is not a state")))?]);
        }
        MilOp::WriteState => {
            let (n, d) = (name_input("input")?, name_input("data")?);
            let data = env.get(d).cloned().ok_or_else(|| err(format!("`{d}` is not defined before its use")))?;
            let st = states.get_mut(n).ok_or_else(|| err(format!("`{n}` is not a state")))?;
            if st.shape != data.shape || st.dt != data.dt {
                return Err(err(format!("writes {:?} into a state of {:?}", data.shape, st.shape)));
            }
            *st = data;
            return Ok(vec![]);
        }
        // Evaluated when the program loads, never as a step.
        MilOp::Const | MilOp::ConstexprBlockwiseShiftScale | MilOp::ConstexprAffineDequantize => {
            return Err(err(format!("`{}` is a load-time op", step.ty.name())))
        }
    })])
}

type Masks = (Vec<bool>, Vec<bool>, Vec<bool>);
/// Per-axis [start, end) of a slice, and the result's shape.
type Region = (Vec<(usize, usize)>, Vec<usize>);

fn step_masks(opt: &dyn Fn(&str) -> Result<Option<Tensor>, MilError>, rank: usize) -> Result<Masks, MilError> {
    let flags = |k: &str| -> Result<Vec<bool>, MilError> {
        Ok(opt(k)?.map(|t| t.data.iter().map(|v| *v != 0.0).collect()).unwrap_or_else(|| vec![false; rank]))
    };
    if let Some(s) = opt("stride")? {
        if s.data.iter().any(|v| *v != 1.0) {
            return Err(MilError::Usage("slices with strides other than 1 are not implemented".into()));
        }
    }
    Ok((flags("begin_mask")?, flags("end_mask")?, flags("squeeze_mask")?))
}

/// Per-axis [start, end) of a stride-1 slice, and the result's shape.
fn slice_region(shape: &[usize], begin: &[i64], end: &[i64], (bm, em, sm): &Masks) -> Result<Region, String> {
    if begin.len() != shape.len() || end.len() != shape.len() {
        return Err(format!("begin/end of length {} for rank {}", begin.len(), shape.len()));
    }
    let mut region = Vec::new();
    let mut out = Vec::new();
    for ax in 0..shape.len() {
        let d = shape[ax] as i64;
        let norm = |v: i64| if v < 0 { v + d } else { v };
        let b = if bm[ax] { 0 } else { norm(begin[ax]) };
        let e = if sm[ax] {
            b + 1
        } else if em[ax] {
            d
        } else {
            norm(end[ax])
        };
        if b < 0 || e > d || b > e {
            return Err(format!("slice [{b}, {e}) outside axis {ax} of size {d}"));
        }
        region.push((b as usize, e as usize));
        if !sm[ax] {
            out.push((e - b) as usize);
        }
    }
    Ok((region, out))
}

fn region_offsets(shape: &[usize], region: &[(usize, usize)]) -> Vec<usize> {
    let st = strides(shape);
    let mut offs = vec![0usize];
    for (ax, (b, e)) in region.iter().enumerate() {
        let mut next = Vec::with_capacity(offs.len() * (e - b));
        for o in &offs {
            for i in *b..*e {
                next.push(o + i * st[ax]);
            }
        }
        offs = next;
    }
    offs
}

fn gather_region(x: &Tensor, region: &[(usize, usize)]) -> Vec<f32> {
    region_offsets(&x.shape, region).iter().map(|o| x.data[*o]).collect()
}

fn scatter_region(x: &mut Tensor, region: &[(usize, usize)], values: &[f32]) {
    for (o, v) in region_offsets(&x.shape, region).iter().zip(values) {
        x.data[*o] = *v;
    }
}

fn broadcast_binary(x: &Tensor, y: &Tensor, f: fn(f32, f32) -> f32) -> Result<Tensor, String> {
    let shape = slmc_targets::coreml::broadcast(&x.shape, &y.shape);
    let r = shape.len();
    let pad = |s: &[usize]| -> Vec<usize> { std::iter::repeat_n(1, r - s.len()).chain(s.iter().copied()).collect() };
    let (xs, ys) = (pad(&x.shape), pad(&y.shape));
    for ax in 0..r {
        for s in [xs[ax], ys[ax]] {
            if s != 1 && s != shape[ax] {
                return Err(format!("shapes {:?} and {:?} do not broadcast", x.shape, y.shape));
            }
        }
    }
    let n: usize = shape.iter().product();
    if xs == shape && ys == shape {
        let data = x.data.iter().zip(&y.data).map(|(a, b)| f(*a, *b)).collect();
        return Ok(Tensor { dt: x.dt, shape, data });
    }
    let (xst, yst, ost) = (strides(&xs), strides(&ys), strides(&shape));
    // Offsets once per row of the last axis; within a row each side steps by 1 or 0.
    let last = shape[r - 1];
    let (xstep, ystep) = ((xs[r - 1] != 1) as usize, (ys[r - 1] != 1) as usize);
    let mut data = Vec::with_capacity(n);
    for row in 0..n / last.max(1) {
        let i = row * last;
        let (mut xi, mut yi) = (0, 0);
        for ax in 0..r - 1 {
            let c = i / ost[ax] % shape[ax];
            if xs[ax] != 1 {
                xi += c * xst[ax];
            }
            if ys[ax] != 1 {
                yi += c * yst[ax];
            }
        }
        for j in 0..last {
            data.push(f(x.data[xi + j * xstep], y.data[yi + j * ystep]));
        }
    }
    Ok(Tensor { dt: x.dt, shape, data })
}

fn transpose(x: &Tensor, perm: &[usize]) -> Result<Tensor, String> {
    if perm.len() != x.shape.len() {
        return Err(format!("perm {perm:?} for rank {}", x.shape.len()));
    }
    let shape: Vec<usize> = perm.iter().map(|p| x.shape[*p]).collect();
    let (xst, ost) = (x.strides(), strides(&shape));
    let n = x.data.len();
    let mut data = vec![0.0; n];
    for (i, d) in data.iter_mut().enumerate() {
        let mut src = 0;
        for (ax, p) in perm.iter().enumerate() {
            src += (i / ost[ax] % shape[ax]) * xst[*p];
        }
        *d = x.data[src];
    }
    Ok(Tensor { dt: x.dt, shape, data })
}

fn concat(parts: &[Tensor], axis: usize) -> Result<Tensor, String> {
    let mut shape = parts[0].shape.clone();
    for p in &parts[1..] {
        if p.shape.len() != shape.len() || (0..shape.len()).any(|a| a != axis && p.shape[a] != shape[a]) {
            return Err(format!("cannot concatenate {:?} and {:?} on axis {axis}", parts[0].shape, p.shape));
        }
    }
    shape[axis] = parts.iter().map(|p| p.shape[axis]).sum();
    let outer: usize = shape[..axis].iter().product();
    let mut data = Vec::with_capacity(shape.iter().product());
    for o in 0..outer {
        for p in parts {
            let chunk: usize = p.shape[axis..].iter().product();
            data.extend_from_slice(&p.data[o * chunk..(o + 1) * chunk]);
        }
    }
    Ok(Tensor { dt: parts[0].dt, shape, data })
}

fn tile(x: &Tensor, reps: &[usize]) -> Result<Tensor, String> {
    if reps.len() != x.shape.len() {
        return Err(format!("reps {reps:?} for rank {}", x.shape.len()));
    }
    let shape: Vec<usize> = x.shape.iter().zip(reps).map(|(d, r)| d * r).collect();
    let (xst, ost) = (x.strides(), strides(&shape));
    let n: usize = shape.iter().product();
    let data = (0..n)
        .map(|i| {
            let mut src = 0;
            for ax in 0..shape.len() {
                src += (i / ost[ax] % shape[ax]) % x.shape[ax] * xst[ax];
            }
            x.data[src]
        })
        .collect();
    Ok(Tensor { dt: x.dt, shape, data })
}

fn softmax(r: &mut [f32]) {
    let m = r.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0;
    for v in r.iter_mut() {
        *v = if *v == f32::NEG_INFINITY { 0.0 } else { (*v - m).exp() };
        sum += *v;
    }
    for v in r.iter_mut() {
        *v /= sum;
    }
}

/// `c[m, n] = a[m, k] b[k, n]` with element strides (row, column) for a and b.
#[allow(clippy::too_many_arguments)]
fn gemm(
    m: usize,
    k: usize,
    n: usize,
    a: &[f32],
    (ars, acs): (isize, isize),
    b: &[f32],
    (brs, bcs): (isize, isize),
    c: &mut [f32],
) {
    // SAFETY: the strides describe matrices inside `a`, `b` and `c` (checked by the callers'
    // shape checks), and `c` is a distinct, exclusively borrowed buffer of m * n values.
    unsafe {
        matrixmultiply::sgemm(
            m,
            k,
            n,
            1.0,
            a.as_ptr(),
            ars,
            acs,
            b.as_ptr(),
            brs,
            bcs,
            0.0,
            c.as_mut_ptr(),
            n as isize,
            1,
        );
    }
}

/// Batched `x @ y` (optionally transposed) over equal or broadcast leading dimensions,
/// times `alpha`, plus an optional broadcast additive mask.
fn batched_matmul(
    x: &Tensor,
    y: &Tensor,
    tx: bool,
    ty: bool,
    alpha: f32,
    mask: Option<&Tensor>,
) -> Result<Tensor, String> {
    let (xr, yr) = (x.shape.len(), y.shape.len());
    if xr < 2 || xr != yr {
        return Err(format!("matmul of ranks {xr} and {yr}"));
    }
    let (xm, xk) = (x.shape[xr - 2], x.shape[xr - 1]);
    let (m, k) = if tx { (xk, xm) } else { (xm, xk) };
    let (yk, n) = if ty { (y.shape[yr - 1], y.shape[yr - 2]) } else { (y.shape[yr - 2], y.shape[yr - 1]) };
    if k != yk {
        return Err(format!("inner dimensions differ: {:?} x {:?}", x.shape, y.shape));
    }
    let batch = slmc_targets::coreml::broadcast(&x.shape[..xr - 2], &y.shape[..yr - 2]);
    let nb: usize = batch.iter().product();
    let (bxs, bys) = (strides(&x.shape[..xr - 2]), strides(&y.shape[..yr - 2]));
    let bst = strides(&batch);
    let mut data = vec![0.0f32; nb * m * n];
    for bi in 0..nb {
        let (mut xo, mut yo) = (0, 0);
        for ax in 0..batch.len() {
            let c = bi / bst[ax] % batch[ax];
            if x.shape[ax] != 1 {
                xo += c * bxs[ax];
            }
            if y.shape[ax] != 1 {
                yo += c * bys[ax];
            }
        }
        let xa = &x.data[xo * xm * xk..(xo + 1) * xm * xk];
        let ya = &y.data[yo * y.shape[yr - 2] * y.shape[yr - 1]..(yo + 1) * y.shape[yr - 2] * y.shape[yr - 1]];
        let xs = if tx { (1, xk as isize) } else { (xk as isize, 1) };
        let ys = if ty { (1, y.shape[yr - 1] as isize) } else { (y.shape[yr - 1] as isize, 1) };
        gemm(m, k, n, xa, xs, ya, ys, &mut data[bi * m * n..(bi + 1) * m * n]);
    }
    let mut shape = batch;
    shape.extend([m, n]);
    let mut t = Tensor { dt: x.dt, shape, data };
    if alpha != 1.0 {
        for v in &mut t.data {
            *v *= alpha;
        }
    }
    if let Some(mask) = mask {
        t = broadcast_binary(&t, mask, |a, b| a + b)?;
    }
    Ok(t)
}
