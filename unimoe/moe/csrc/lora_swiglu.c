/* Fused row kernels for the LoRA-expert SwiGLU layer (unimoe/moe/experts.py, _LoRAExpertLoop), fp32 on a CPU; built
 * and loaded by unimoe/moe/native.py.
 *
 * Why by hand: on a CPU that layer is bound by passes over its (n, I) per-slot tensors and by rank-r products too
 * thin for BLAS to run well, not by its large products. Through torch ops each step of the chain (gather the frozen
 * pre-activations, add the rank-r terms, SiLU, gate, weight, scatter; in the backward the SiLU derivative, the gate,
 * the rank-r terms, two scatters and three (r, n) x (n, I) factor gradients) is a pass over memory. Here a slot's row
 * goes through the whole chain block by block while the block is in L1, and the factor gradients are summed from
 * the same blocks. The frozen FFN's products stay with torch's BLAS.
 *
 * One call handles one expert's slots: rows j = 0..n-1, token t = index[j]. Tokens are unique within an expert, so
 * tiles of ROWS rows run in parallel (OpenMP) without two threads writing the same token row. Within a tile the work
 * goes column block by column block, the tile's (ROWS, BLOCK) slices staying in L1. Layouts (row-major):
 *   g0, u0, mixed, grad_mixed, grad_g0, grad_u0 (T, I); g, u (n, I); a (n, 2r) = s x A_gu^T (gate | up);
 *   t0, grad_t0 (n, r); grad_a (n, 2r); w (n,);
 *   the factors B_gate^T, B_up^T, A_down, all (r, I), in "column slices": (I / LANES, r, LANES), slice s holding
 *   columns s LANES .. s LANES + LANES - 1 of the r rows one after another (so a loop over k reads consecutive
 *   memory; see rank_update).
 * I must be a multiple of LANES (native.py falls back to torch ops otherwise).
 */
#include <omp.h>
#include <stdint.h>
#include <string.h>

/* Tuned at I = 2048, r = 16 on 2 AMD EPYC (Zen 4) cores: forward and backward changed by under 10% between
 * ROWS x BLOCK = 1 x 2048 and 16 x 128. */
#define BLOCK 128 /* columns per block (a multiple of LANES) */
#define ROWS 8    /* rows per tile: a factor-gradient accumulator is loaded and stored once per tile */
#define LANES 16  /* floats per vector (one AVX-512 register; two AVX2 ones); reductions keep LANES partial sums */

/* exp for the vectorized loops. glibc's expf vectorizes only under -ffast-math, whose crtfastmath would switch the
 * whole process to flush-to-zero, and GCC 12 does not vectorize floorf; so: Cody-Waite range reduction
 * x = n ln2 + f with |f| <= ln2 / 2 (n rounded to nearest by adding and subtracting 1.5 * 2^23), then the degree-6
 * polynomial for e^f from Cephes' expf (relative error about 2e-7), scaled by 2^n built in the exponent bits. */
static inline float exp_f32(float x) {
    x = x < -87.0f ? -87.0f : x;
    x = x > 88.0f ? 88.0f : x;
    const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
    const float f = x - n * 0.693359375f + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * f + 1.3981999507e-3f;
    p = p * f + 8.3334519073e-3f;
    p = p * f + 4.1665795894e-2f;
    p = p * f + 1.6666665459e-1f;
    p = p * f + 5.0000001201e-1f;
    p = p * f * f + f + 1.0f;
    union {
        int32_t i;
        float f;
    } scale = {.i = ((int32_t)n + 127) << 23};
    return p * scale.f;
}

typedef float vec __attribute__((vector_size(LANES * sizeof(float)), aligned(sizeof(float))));

static inline vec vload(const float *p) {
    vec v;
    memcpy(&v, p, sizeof v);
    return v;
}

/* out[i] = scale base[i] + sum_k coef[k] B[k][i] for i < m (m a multiple of LANES): a row block plus its rank-r
 * term, with B packed in column slices: slice s (columns s LANES ...) holds its r rows of LANES floats one after
 * another at bp + s r LANES, so the loop over k reads consecutive memory (the (r, I) rows themselves lie I floats
 * apart, and r of them at a 4 KB multiple fight over the same L1 sets: it was slower than the torch ops it replaces).
 * Written with GCC's vector type so each column slice stays in a register through the loop over k (GCC 12 does not
 * vectorize a column loop around an inner loop), and four slices at a time, since one slice's r fused multiply-adds
 * form a chain that waits on each one's latency. */
static inline void rank_update(float *restrict out, const float *restrict base, float scale, const float *restrict coef,
                               const float *restrict bp, int64_t r, int64_t m) {
    const int64_t slice = r * LANES;
    int64_t i = 0;
    for (; i + 4 * LANES <= m; i += 4 * LANES, bp += 4 * slice) {
        vec v0 = vload(base + i) * scale, v1 = vload(base + i + LANES) * scale;
        vec v2 = vload(base + i + 2 * LANES) * scale, v3 = vload(base + i + 3 * LANES) * scale;
        for (int64_t k = 0; k < r; k++) {
            const float ck = coef[k];
            v0 += ck * vload(bp + k * LANES);
            v1 += ck * vload(bp + slice + k * LANES);
            v2 += ck * vload(bp + 2 * slice + k * LANES);
            v3 += ck * vload(bp + 3 * slice + k * LANES);
        }
        memcpy(out + i, &v0, sizeof v0);
        memcpy(out + i + LANES, &v1, sizeof v1);
        memcpy(out + i + 2 * LANES, &v2, sizeof v2);
        memcpy(out + i + 3 * LANES, &v3, sizeof v3);
    }
    for (; i < m; i += LANES, bp += slice) {
        vec v = vload(base + i) * scale;
        for (int64_t k = 0; k < r; k++) v += coef[k] * vload(bp + k * LANES);
        memcpy(out + i, &v, sizeof v);
    }
}

/* Ask for the next block of a gathered row before it is needed: the rows of a tile are read a block at a time,
 * in turn, which the hardware prefetchers do not follow (the loads of these rows took half the forward's time). */
static inline void prefetch_block(const float *p, int64_t left) {
    const int64_t m = left < BLOCK ? left : BLOCK;
    for (int64_t i = 0; i < m; i += 64 / sizeof(float)) __builtin_prefetch(p + i);
}

/* dst[i] = scale src[i] (set) or dst[i] += scale src[i] for i < m: a scatter row's first writer sets it, so the
 * caller need not zero the (T, I) destination (a 16 MB fill at T = I = 2048, page faults included) */
static inline void put(float *restrict dst, const float *restrict src, float scale, int64_t m, int set) {
    if (set) {
#pragma omp simd
        for (int64_t i = 0; i < m; i++) dst[i] = scale * src[i];
    } else {
#pragma omp simd
        for (int64_t i = 0; i < m; i++) dst[i] += scale * src[i];
    }
}

/* acc[l] += sum of x[i] y[i] over i = l (mod LANES), i < m: a dot product left in LANES partial sums (four chains of
 * them while it runs, for the same reason as above) */
static inline void lane_dot(float *restrict acc, const float *restrict x, const float *restrict y, int64_t m) {
    vec p0 = {0}, p1 = {0}, p2 = {0}, p3 = {0};
    int64_t i = 0;
    for (; i + 4 * LANES <= m; i += 4 * LANES) {
        p0 += vload(x + i) * vload(y + i);
        p1 += vload(x + i + LANES) * vload(y + i + LANES);
        p2 += vload(x + i + 2 * LANES) * vload(y + i + 2 * LANES);
        p3 += vload(x + i + 3 * LANES) * vload(y + i + 3 * LANES);
    }
    vec sum = vload(acc) + ((p0 + p1) + (p2 + p3));
    memcpy(acc, &sum, sizeof sum);
    for (; i < m; i++) acc[0] += x[i] * y[i];
}

/* acc[k] += x . B[k] for k < r over a row block x (m a multiple of LANES), each dot left in LANES partial sums
 * (acc is (r, LANES)), with B in column slices as in rank_update. Eight rows of B at a time, each with its own
 * register: a slice of x is loaded once for eight products, not once for each (lane_dot's two loads an FMA made
 * these reductions a fifth of the backward). */
static inline void rows_dot(float *restrict acc, const float *restrict x, const float *restrict bp, int64_t r,
                            int64_t m) {
    const int64_t slice = r * LANES;
    int64_t k0 = 0;
    for (; k0 + 8 <= r; k0 += 8) {
        vec p[8];
        for (int64_t kk = 0; kk < 8; kk++) p[kk] = vload(acc + (k0 + kk) * LANES);
        for (int64_t sl = 0; sl < m / LANES; sl++) {
            const vec xs = vload(x + sl * LANES);
            const float *b = bp + sl * slice + k0 * LANES;
            for (int64_t kk = 0; kk < 8; kk++) p[kk] += xs * vload(b + kk * LANES);
        }
        memcpy(acc + k0 * LANES, p, sizeof p);
    }
    for (; k0 < r; k0++) {
        vec p0 = vload(acc + k0 * LANES);
        for (int64_t sl = 0; sl < m / LANES; sl++) p0 += vload(x + sl * LANES) * vload(bp + sl * slice + k0 * LANES);
        memcpy(acc + k0 * LANES, &p0, sizeof p0);
    }
}

static inline float lane_sum(const float *acc) {
    float sum = 0.0f;
    for (int64_t l = 0; l < LANES; l++) sum += acc[l];
    return sum;
}

/* Forward, one expert:
 *   g = g0[t] + a_g bg,  u = u0[t] + a_u bu,  h = silu(g) * u,  t0 = h ad^T,  mixed[t] += w h
 * g and u are written out (the backward recomputes h from them). written (T,) flags the rows of mixed that hold a
 * value: a row's first writer sets it instead of adding (the caller zeroes the rows no slot wrote, if any). */
void unimoe_lora_forward(int64_t n, int64_t I, int64_t r, const float *g0, const float *u0, const int64_t *index,
                         const float *a, const float *bg_packed, const float *bu_packed, const float *ad_packed,
                         const float *w, float *g,
                         float *u, float *t0, float *mixed, uint8_t *written, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t j0 = 0; j0 < n; j0 += ROWS) {
        const int64_t nr = n - j0 < ROWS ? n - j0 : ROWS;
        float hb[ROWS][BLOCK];
        float acc[ROWS][r][LANES];
        int set[ROWS];
        memset(acc, 0, sizeof(acc));
        for (int64_t q = 0; q < nr; q++) set[q] = !written[index[j0 + q]];
        for (int64_t c = 0; c < I; c += BLOCK) {
            const int64_t m = I - c < BLOCK ? I - c : BLOCK;
            for (int64_t q = 0; q < nr; q++) {
                const int64_t j = j0 + q, t = index[j];
                const float wj = w[j], *ag = a + j * 2 * r, *au = ag + r;
                float *gj = g + j * I + c, *uj = u + j * I + c, *mr = mixed + t * I + c, *hq = hb[q];
                if (c + BLOCK < I) {
                    prefetch_block(g0 + t * I + c + BLOCK, I - c - BLOCK);
                    prefetch_block(u0 + t * I + c + BLOCK, I - c - BLOCK);
                    prefetch_block(mr + BLOCK, I - c - BLOCK);
                }
                rank_update(gj, g0 + t * I + c, 1.0f, ag, bg_packed + c * r, r, m);
                rank_update(uj, u0 + t * I + c, 1.0f, au, bu_packed + c * r, r, m);
#pragma omp simd
                for (int64_t i = 0; i < m; i++) {
                    const float gv = gj[i];
                    hq[i] = gv / (1.0f + exp_f32(-gv)) * uj[i];
                }
                put(mr, hq, wj, m, set[q]);
            }
            for (int64_t q = 0; q < nr; q++) rows_dot(&acc[q][0][0], hb[q], ad_packed + c * r, r, m);
        }
        for (int64_t q = 0; q < nr; q++) {
            written[index[j0 + q]] = 1;
            for (int64_t k = 0; k < r; k++) t0[(j0 + q) * r + k] = lane_sum(acc[q][k]);
        }
    }
}

/* acc_s[k] += sum_q coef[q r + k] x_q[s] for each column slice s < m / LANES and k < r: a tile's contribution to a
 * factor gradient kept in column slices (acc at slice s holds its r rows of LANES floats). The tile's rows x_q
 * (ROWS, BLOCK) are in L1; each accumulator vector is loaded and stored once per tile. */
static inline void tile_outer(float *restrict acc, const float *restrict coef, const float (*x)[BLOCK], int64_t nr,
                              int64_t r, int64_t m) {
    for (int64_t sl = 0; sl < m / LANES; sl++, acc += r * LANES) {
        vec xs[ROWS];
        for (int64_t q = 0; q < nr; q++) xs[q] = vload(x[q] + sl * LANES);
        for (int64_t k = 0; k < r; k++) {
            vec v = vload(acc + k * LANES);
            for (int64_t q = 0; q < nr; q++) v += coef[q * r + k] * xs[q];
            memcpy(acc + k * LANES, &v, sizeof v);
        }
    }
}

/* Backward, one expert. With gm = grad_mixed[t]:
 *   h = silu(g) u (recomputed),  dot[j] = gm . h,  grad_h = w gm + grad_t0 ad,
 *   grad_u = grad_h silu(g),  grad_g = grad_h u silu'(g),  grad_g0[t] += grad_g,  grad_u0[t] += grad_u,
 *   grad_a = s [grad_g bg^T, grad_u bu^T],
 *   and the expert's factor gradients  grad_bg += grad_g^T a_g,  grad_bu += grad_u^T a_u,  grad_ad += grad_t0^T h
 * (a = s x A_gu^T as in the forward), each thread adding into its own copy in column slices: grad_bg, grad_bu and
 * grad_ad are (threads, I / LANES, r, LANES), zeroed by the caller, who sums the copies. written flags rows of
 * grad_g0 and grad_u0 as in the forward. Summed here rather than as
 * (r, n) x (n, I) products after the loop: those re-read three (n, I) tensors that this loop would have to write. */
void unimoe_lora_backward(int64_t n, int64_t I, int64_t r, float s, const float *g, const float *u,
                          const float *grad_mixed, const int64_t *index, const float *grad_t0, const float *a,
                          const float *bg_packed, const float *bu_packed, const float *ad_packed, const float *w,
                          float *grad_g0,
                          float *grad_u0, float *dot, float *grad_a, float *grad_bg, float *grad_bu, float *grad_ad,
                          uint8_t *written, int threads) {
#pragma omp parallel num_threads(threads)
    {
        const int64_t copy = (int64_t)omp_get_thread_num() * I * r;
        float *acc_bg = grad_bg + copy, *acc_bu = grad_bu + copy, *acc_ad = grad_ad + copy;
#pragma omp for schedule(static)
        for (int64_t j0 = 0; j0 < n; j0 += ROWS) {
            const int64_t nr = n - j0 < ROWS ? n - j0 : ROWS;
            float gh[ROWS][BLOCK], hb[ROWS][BLOCK], ggb[ROWS][BLOCK], gub[ROWS][BLOCK];
            float acc_g[ROWS][r][LANES], acc_u[ROWS][r][LANES], dots[ROWS][LANES];
            float coef_g[ROWS * r], coef_u[ROWS * r];  /* the tile's a_g and a_u rows, packed */
            int set[ROWS];
            for (int64_t q = 0; q < nr; q++) set[q] = !written[index[j0 + q]];
            memset(acc_g, 0, sizeof(acc_g));
            memset(acc_u, 0, sizeof(acc_u));
            memset(dots, 0, sizeof(dots));
            for (int64_t q = 0; q < nr; q++)
                for (int64_t k = 0; k < r; k++) {
                    coef_g[q * r + k] = a[(j0 + q) * 2 * r + k];
                    coef_u[q * r + k] = a[(j0 + q) * 2 * r + r + k];
                }
            for (int64_t c = 0; c < I; c += BLOCK) {
                const int64_t m = I - c < BLOCK ? I - c : BLOCK;
                for (int64_t q = 0; q < nr; q++) {
                    const int64_t j = j0 + q, t = index[j];
                    const float *gj = g + j * I + c, *uj = u + j * I + c, *gmr = grad_mixed + t * I + c;
                    float *ghq = gh[q], *hq = hb[q], *ggq = ggb[q], *guq = gub[q];
                    float *gg0r = grad_g0 + t * I + c, *gu0r = grad_u0 + t * I + c;
                    if (c + BLOCK < I) {
                        prefetch_block(gmr + BLOCK, I - c - BLOCK);
                        prefetch_block(gg0r + BLOCK, I - c - BLOCK);
                        prefetch_block(gu0r + BLOCK, I - c - BLOCK);
                    }
                    rank_update(ghq, gmr, w[j], grad_t0 + j * r, ad_packed + c * r, r, m);
#pragma omp simd
                    for (int64_t i = 0; i < m; i++) {
                        const float gv = gj[i], uv = uj[i];
                        const float sig = 1.0f / (1.0f + exp_f32(-gv));
                        const float act = gv * sig;
                        const float gu = ghq[i] * act;
                        const float gg = ghq[i] * uv * sig * (1.0f + gv * (1.0f - sig));
                        hq[i] = act * uv;
                        ggq[i] = gg;
                        guq[i] = gu;
                    }
                    put(gg0r, ggq, 1.0f, m, set[q]);
                    put(gu0r, guq, 1.0f, m, set[q]);
                    lane_dot(dots[q], gmr, hq, m);
                }
                for (int64_t q = 0; q < nr; q++) {
                    rows_dot(&acc_g[q][0][0], ggb[q], bg_packed + c * r, r, m);
                    rows_dot(&acc_u[q][0][0], gub[q], bu_packed + c * r, r, m);
                }
                tile_outer(acc_bg + c * r, coef_g, (const float(*)[BLOCK])ggb, nr, r, m);
                tile_outer(acc_bu + c * r, coef_u, (const float(*)[BLOCK])gub, nr, r, m);
                tile_outer(acc_ad + c * r, grad_t0 + j0 * r, (const float(*)[BLOCK])hb, nr, r, m);
            }
            for (int64_t q = 0; q < nr; q++) {
                const int64_t j = j0 + q;
                written[index[j]] = 1;
                dot[j] = lane_sum(dots[q]);
                for (int64_t k = 0; k < r; k++) {
                    grad_a[j * 2 * r + k] = s * lane_sum(acc_g[q][k]);
                    grad_a[j * 2 * r + r + k] = s * lane_sum(acc_u[q][k]);
                }
            }
        }
    }
}

/* The column slice width the packed factors must use (and I must be a multiple of). */
int unimoe_lanes(void) { return LANES; }
