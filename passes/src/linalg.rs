//! The dense linear algebra GPTQ needs, in f64 on row-major square matrices: a Gram
//! matrix, a blocked Cholesky factorization and a lower-triangular inverse. The block
//! updates go through `matrixmultiply` (already the interpreter's GEMM), so the cubic
//! parts run at GEMM speed without a full linear-algebra crate.

use rayon::prelude::*;

/// Block size of the blocked factorizations.
const BLOCK: usize = 64;

/// Adds `x^T x` for `x` of `rows` rows and `cols` columns (row-major) to `acc`.
pub fn gram_accumulate(x: &[f32], rows: usize, cols: usize, acc: &mut [f32]) {
    assert!(x.len() >= rows * cols && acc.len() == cols * cols);
    // SAFETY: A = x^T (cols × rows, strides 1 and cols) and B = x (rows × cols, strides
    // cols and 1) stay inside x; C is cols × cols.
    unsafe {
        matrixmultiply::sgemm(
            cols,
            rows,
            cols,
            1.0,
            x.as_ptr(),
            1,
            cols as isize,
            x.as_ptr(),
            cols as isize,
            1,
            1.0,
            acc.as_mut_ptr(),
            cols as isize,
            1,
        );
    }
}

/// `x^T x` in f64.
pub fn gram(x: &[f32], rows: usize, cols: usize) -> Vec<f64> {
    let mut g = vec![0.0f32; cols * cols];
    gram_accumulate(x, rows, cols, &mut g);
    g.into_iter().map(f64::from).collect()
}

/// `c[m × n] += alpha * a[m × k] * b[k × n]`, each given by its start and row stride
/// (column stride 1, or `b_transposed`: `b` is read as the transpose of a row-major block).
#[allow(clippy::too_many_arguments)]
fn gemm(
    m: usize,
    k: usize,
    n: usize,
    alpha: f64,
    a: *const f64,
    lda: usize,
    b: *const f64,
    ldb: usize,
    b_transposed: bool,
    c: *mut f64,
    ldc: usize,
) {
    if m == 0 || n == 0 || k == 0 {
        return;
    }
    let (rsb, csb) = if b_transposed { (1, ldb as isize) } else { (ldb as isize, 1) };
    // SAFETY: callers pass blocks that lie inside their matrices, and c does not overlap
    // a or b.
    unsafe { matrixmultiply::dgemm(m, k, n, alpha, a, lda as isize, 1, b, rsb, csb, 1.0, c, ldc as isize, 1) }
}

/// Replaces the symmetric positive definite `a` (n × n) by its lower Cholesky factor L
/// (a = L L^T; the strict upper triangle is zeroed). Err(j) when pivot j is not positive.
pub fn cholesky(a: &mut [f64], n: usize) -> Result<(), usize> {
    assert_eq!(a.len(), n * n);
    for k0 in (0..n).step_by(BLOCK) {
        let b = BLOCK.min(n - k0);
        // The diagonal block, unblocked (earlier blocks' updates are already applied).
        for j in k0..k0 + b {
            let row_j: Vec<f64> = a[j * n + k0..j * n + j].to_vec();
            let d = a[j * n + j] - row_j.iter().map(|v| v * v).sum::<f64>();
            if d.is_nan() || d <= 0.0 {
                return Err(j);
            }
            let ljj = d.sqrt();
            a[j * n + j] = ljj;
            for i in j + 1..k0 + b {
                let s: f64 = a[i * n + k0..i * n + j].iter().zip(&row_j).map(|(x, y)| x * y).sum();
                a[i * n + j] = (a[i * n + j] - s) / ljj;
            }
        }
        let below = k0 + b;
        if below == n {
            break;
        }
        // The panel below it: each row solves against the diagonal block independently.
        let diag: Vec<f64> =
            (k0..k0 + b).flat_map(|j| a[j * n + k0..j * n + k0 + b].iter().copied().collect::<Vec<_>>()).collect();
        a[below * n..].par_chunks_mut(n).for_each(|row| {
            for j in 0..b {
                let s: f64 = row[k0..k0 + j].iter().zip(&diag[j * b..j * b + j]).map(|(x, y)| x * y).sum();
                row[k0 + j] = (row[k0 + j] - s) / diag[j * b + j];
            }
        });
        // Trailing update A22 -= L21 L21^T (the whole block; only its lower half is used).
        let m = n - below;
        let base = a.as_mut_ptr();
        // SAFETY: L21 is columns k0..below of rows below..n; A22 is columns below..n of
        // the same rows: disjoint regions of `a`.
        unsafe {
            let l21 = base.add(below * n + k0) as *const f64;
            gemm(m, b, m, -1.0, l21, n, l21, n, true, base.add(below * n + below), n);
        }
    }
    for i in 0..n {
        a[i * n + i + 1..(i + 1) * n].fill(0.0);
    }
    Ok(())
}

/// The inverse of a lower-triangular `l` (n × n, nonzero diagonal), itself lower triangular.
pub fn lower_inverse(l: &[f64], n: usize) -> Vec<f64> {
    let mut inv = vec![0.0f64; n * n];
    for i0 in (0..n).step_by(BLOCK) {
        let b = BLOCK.min(n - i0);
        // Rows i0..i0+b: L[I, :i0] M[:i0, :] + L[I, I] M[I, :] = E[I, :]; first the
        // finished rows' share, -L[I, :i0] M[:i0, :i0], by GEMM.
        let (done, rest) = inv.split_at_mut(i0 * n);
        gemm(b, i0, i0, -1.0, l[i0 * n..].as_ptr(), n, done.as_ptr(), n, false, rest.as_mut_ptr(), n);
        for r in 0..b {
            let i = i0 + r;
            rest[r * n + i] = 1.0;
            for q in 0..r {
                let coef = l[i * n + i0 + q];
                let (prev, cur) = rest.split_at_mut(r * n);
                let prev = &prev[q * n..q * n + i0 + q + 1];
                for (c, p) in cur[..i0 + q + 1].iter_mut().zip(prev) {
                    *c -= coef * p;
                }
            }
            let d = l[i * n + i];
            for c in &mut rest[r * n..r * n + i + 1] {
                *c /= d;
            }
        }
    }
    inv
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spd(n: usize) -> Vec<f64> {
        // x^T x + n I for a deterministic x: symmetric positive definite.
        let rows = n + 7;
        let x: Vec<f32> = (0..rows * n).map(|i| ((i * 7919 % 1000) as f32 / 500.0) - 1.0).collect();
        let mut g = gram(&x, rows, n);
        for i in 0..n {
            g[i * n + i] += n as f64;
        }
        g
    }

    fn matmul(a: &[f64], b: &[f64], n: usize, b_t: bool) -> Vec<f64> {
        let mut c = vec![0.0; n * n];
        for i in 0..n {
            for j in 0..n {
                c[i * n + j] = (0..n).map(|k| a[i * n + k] * if b_t { b[j * n + k] } else { b[k * n + j] }).sum();
            }
        }
        c
    }

    #[test]
    fn cholesky_reconstructs_across_block_boundaries() {
        for n in [1, 5, 64, 65, 150] {
            let a = spd(n);
            let mut l = a.clone();
            cholesky(&mut l, n).unwrap();
            let back = matmul(&l, &l, n, true);
            let worst = a.iter().zip(&back).map(|(x, y)| (x - y).abs() / x.abs().max(1.0)).fold(0.0, f64::max);
            assert!(worst < 1e-10, "n {n}: {worst}");
            assert!((0..n).all(|i| (i + 1..n).all(|j| l[i * n + j] == 0.0)));
        }
    }

    #[test]
    fn cholesky_refuses_an_indefinite_matrix() {
        let mut a = vec![1.0, 2.0, 2.0, 1.0];
        assert_eq!(cholesky(&mut a, 2), Err(1));
    }

    #[test]
    fn lower_inverse_is_an_inverse() {
        for n in [1, 3, 64, 130] {
            let mut l = spd(n);
            cholesky(&mut l, n).unwrap();
            let inv = lower_inverse(&l, n);
            let id = matmul(&l, &inv, n, false);
            for i in 0..n {
                for j in 0..n {
                    let want = if i == j { 1.0 } else { 0.0 };
                    assert!((id[i * n + j] - want).abs() < 1e-9, "n {n} ({i},{j}): {}", id[i * n + j]);
                }
            }
        }
    }
}
