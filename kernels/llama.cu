// Kernels of the CUDA backend, compiled at worker start with NVRTC for the GPU found.
//
// Activations are f32, weights and the KV cache bf16 (stored as raw 16-bit words so that no CUDA
// header is needed at run time). Every kernel matches one method of the Rust `Backend` trait; the
// Rust side (worker/src/backend/cuda.rs) documents the layouts.

typedef unsigned short bf16;
typedef unsigned int u32;

#define NEG_INF __int_as_float(0xff800000)

__device__ __forceinline__ float bf16_to_f32(bf16 x) { return __uint_as_float(((u32)x) << 16); }

// Round to nearest even, as PyTorch does; NaN stays NaN.
__device__ __forceinline__ bf16 f32_to_bf16(float f) {
    u32 u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (bf16)((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (bf16)(u >> 16);
}

struct Sum {
    static __device__ __forceinline__ float init() { return 0.f; }
    __device__ __forceinline__ float operator()(float a, float b) const { return a + b; }
};
struct Max {
    static __device__ __forceinline__ float init() { return NEG_INF; }
    __device__ __forceinline__ float operator()(float a, float b) const { return fmaxf(a, b); }
};

template <typename Op>
__device__ __forceinline__ float warp_reduce(float v, Op op) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

__device__ __forceinline__ float warp_sum(float v) { return warp_reduce(v, Sum{}); }

// `op` over the whole block; `red` holds one float per warp.
template <typename Op>
__device__ float block_reduce(float v, float* red, Op op) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
    v = warp_reduce(v, op);
    __syncthreads();
    if (lane == 0) red[warp] = v;
    __syncthreads();
    float t = Op::init();
    for (int w = 0; w < warps; ++w) t = op(t, red[w]);
    return t;
}

__device__ float block_sum(float v, float* red) { return block_reduce(v, red, Sum{}); }

// Four bf16 weights from an 8-byte aligned address.
__device__ __forceinline__ float4 bf16x4(const bf16* w) {
    uint2 p = *(const uint2*)w;
    return make_float4(__uint_as_float(p.x << 16), __uint_as_float(p.x & 0xffff0000u),
                       __uint_as_float(p.y << 16), __uint_as_float(p.y & 0xffff0000u));
}

extern "C" __global__ void embed_rows(const bf16* table, const u32* ids, float* out, int width) {
    const bf16* src = table + (size_t)ids[blockIdx.x] * width;
    float* dst = out + (size_t)blockIdx.x * width;
    for (int i = threadIdx.x; i < width; i += blockDim.x) dst[i] = bf16_to_f32(src[i]);
}

extern "C" __global__ void f32_to_bf16_n(const float* x, bf16* y, long n) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x)
        y[i] = f32_to_bf16(x[i]);
}

extern "C" __global__ void add_bias(float* out, const bf16* bias, int rows, int width) {
    long n = (long)rows * width;
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x)
        out[i] += bf16_to_f32(bias[i % width]);
}

extern "C" __global__ void add_assign(float* acc, const float* x, long n) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x)
        acc[i] += x[i];
}

// One block per row. A decode step normalizes one row, so the block is wide (the launch gives
// it up to 1024 threads) and moves float4s when the width allows (rows then start 16-byte
// aligned); each thread keeps what it loaded for the second pass.
#define RMS_VEC 4
__device__ __forceinline__ void rms_row(float* acc, const float* x, const bf16* w, float* out, int width,
                                        float eps) {
    __shared__ float red[32];
    float ss = 0.f;
    if ((width & 3) == 0 && width <= RMS_VEC * 4 * (int)blockDim.x) {
        float4 v[RMS_VEC];
#pragma unroll
        for (int k = 0; k < RMS_VEC; ++k) {
            int i = 4 * (threadIdx.x + k * blockDim.x);
            if (i >= width) break;
            float4 a = *(const float4*)(acc + i);
            if (x) {
                float4 b = *(const float4*)(x + i);
                a = make_float4(a.x + b.x, a.y + b.y, a.z + b.z, a.w + b.w);
                *(float4*)(acc + i) = a;
            }
            v[k] = a;
            ss += a.x * a.x + a.y * a.y + a.z * a.z + a.w * a.w;
        }
        float inv = rsqrtf(block_sum(ss, red) / width + eps);
#pragma unroll
        for (int k = 0; k < RMS_VEC; ++k) {
            int i = 4 * (threadIdx.x + k * blockDim.x);
            if (i >= width) break;
            float4 g = bf16x4(w + i);
            *(float4*)(out + i) = make_float4(v[k].x * inv * g.x, v[k].y * inv * g.y, v[k].z * inv * g.z,
                                              v[k].w * inv * g.w);
        }
        return;
    }
    for (int i = threadIdx.x; i < width; i += blockDim.x) {
        float a = acc[i] + (x ? x[i] : 0.f);
        if (x) acc[i] = a;
        ss += a * a;
    }
    // Each thread reads back only the values it wrote: no barrier beyond the reduction's.
    float inv = rsqrtf(block_sum(ss, red) / width + eps);
    for (int i = threadIdx.x; i < width; i += blockDim.x) out[i] = acc[i] * inv * bf16_to_f32(w[i]);
}

extern "C" __global__ void rms_norm(const float* x, const bf16* w, float* out, int width, float eps) {
    size_t row = (size_t)blockIdx.x * width;
    rms_row((float*)(x + row), nullptr, w, out + row, width, eps);
}

// acc += x, then out = rms_norm(acc) * w.
extern "C" __global__ void add_rms_norm(float* acc, const float* x, const bf16* w, float* out, int width,
                                        float eps) {
    size_t row = (size_t)blockIdx.x * width;
    rms_row(acc + row, x + row, w, out + row, width, eps);
}

// Half-split rotation of the first `heads` heads of each row, in place; one block per row.
// Every head turns by the same angles: each is computed once (head_dim <= 2 * ROPE_MAX_HALF).
#define ROPE_MAX_HALF 256
extern "C" __global__ void rope(float* x, const u32* positions, const float* inv_freq, int row_width,
                                int heads, int head_dim) {
    __shared__ float sin_j[ROPE_MAX_HALF], cos_j[ROPE_MAX_HALF];
    float* r = x + (size_t)blockIdx.x * row_width;
    float pos = (float)positions[blockIdx.x];
    int half = head_dim / 2;
    for (int j = threadIdx.x; j < half; j += blockDim.x) sincosf(pos * inv_freq[j], &sin_j[j], &cos_j[j]);
    __syncthreads();
    for (int i = threadIdx.x; i < heads * half; i += blockDim.x) {
        int h = i / half, j = i % half;
        float s = sin_j[j], c = cos_j[j];
        float* p = r + h * head_dim;
        float a = p[j], b = p[j + half];
        p[j] = a * c - b * s;
        p[j + half] = b * c + a * s;
    }
}

extern "C" __global__ void silu_mul(const float* x, float* out, int rows, int width) {
    long n = (long)rows * width;
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        long r = i / width, c = i % width;
        float g = x[r * 2 * width + c], u = x[r * 2 * width + width + c];
        out[i] = g / (1.f + __expf(-g)) * u;
    }
}

// Index of the largest value of a row, for every thread of the block; ties go to the lowest
// index, NaN never wins, and a row of NaN or -inf only gives 0 (as the host's argmax).
__device__ int block_argmax(const float* r, int width) {
    __shared__ float best_v[32];
    __shared__ int best_i[32];
    __shared__ int result;
    float v = NEG_INF;
    int idx = width;
    for (int i = threadIdx.x; i < width; i += blockDim.x)
        if (r[i] > v) {
            v = r[i];
            idx = i;
        }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        float v2 = __shfl_xor_sync(0xffffffffu, v, o);
        int i2 = __shfl_xor_sync(0xffffffffu, idx, o);
        if (v2 > v || (v2 == v && i2 < idx)) {
            v = v2;
            idx = i2;
        }
    }
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) {
        best_v[warp] = v;
        best_i[warp] = idx;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        for (int w = 1; w < (int)(blockDim.x >> 5); ++w)
            if (best_v[w] > v || (best_v[w] == v && best_i[w] < idx)) {
                v = best_v[w];
                idx = best_i[w];
            }
        result = idx < width ? idx : 0;
    }
    __syncthreads();
    return result;
}

// `RowDraw` of worker/src/sampling.rs.
struct RowDraw {
    float temperature;
    u32 top_k;
    float top_p;
    float u;
};

// Order-preserving key of a float: a larger value has a larger key.
__device__ __forceinline__ u32 order_key(float f) {
    u32 b = __float_as_uint(f);
    return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

// Sums each of 16 per-thread values over the block into `tot`, in a fixed order, so the same
// row always gives the same sums (no atomics).
__device__ void block_sum16(const float* v, float (*red)[16], float* tot) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    __syncthreads();
#pragma unroll
    for (int b = 0; b < 16; ++b) {
        float x = warp_sum(v[b]);
        if (lane == 0) red[warp][b] = x;
    }
    __syncthreads();
    if (threadIdx.x < 16) {
        float t = 0.f;
        for (int w = 0; w < warps; ++w) t += red[w][threadIdx.x];
        tot[threadIdx.x] = t;
    }
    __syncthreads();
}

// Radix selection over the keys of a row, four bits a pass from the top: the largest key `t`
// such that the keys at or above `t` (among those at or above `floor`) reach `need`, counted
// one per key (`by_mass` false) or by weight exp((x - m) * inv_t).
__device__ u32 radix_cut(const float* r, int width, u32 floor, bool by_mass, float need, float m,
                         float inv_t, float (*red)[16], float* tot) {
    __shared__ u32 prefix_s;
    __shared__ float need_s;
    u32 prefix = 0;
    for (int shift = 28; shift >= 0; shift -= 4) {
        const u32 hi = shift == 28 ? 0u : ~0u << (shift + 4);
        float bins[16];
#pragma unroll
        for (int b = 0; b < 16; ++b) bins[b] = 0.f;
        for (int i = threadIdx.x; i < width; i += blockDim.x) {
            const u32 key = order_key(r[i]);
            if (key < floor || (key & hi) != (prefix & hi)) continue;
            const u32 bin = (key >> shift) & 15u;
            const float w = by_mass ? __expf((r[i] - m) * inv_t) : 1.f;
#pragma unroll
            for (int b = 0; b < 16; ++b) bins[b] += bin == (u32)b ? w : 0.f;
        }
        block_sum16(bins, red, tot);
        if (threadIdx.x == 0) {
            int b = 15;
            // The bin where the running total from the top reaches what is still needed; the
            // lowest non-empty one if rounding leaves the total short.
            int lowest = -1;
            for (; b >= 0; --b) {
                if (tot[b] > 0.f) lowest = b;
                if (tot[b] >= need) break;
                need -= tot[b];
            }
            if (b < 0) b = lowest < 0 ? 0 : lowest;
            prefix_s = prefix | ((u32)b << shift);
            need_s = need;
        }
        __syncthreads();
        prefix = prefix_s;
        need = need_s;
    }
    return prefix;
}

// The token each row gives under its draw (the rule of worker/src/sampling.rs): one block of
// 1024 threads per row, and only the token id leaves the GPU.
extern "C" __global__ void __launch_bounds__(1024) sample_rows(const float* x, const RowDraw* draws, u32* out,
                                                               int width) {
    __shared__ float red[32][16];
    __shared__ float tot[16];
    __shared__ float scan[32];
    __shared__ int picked;
    const float* r = x + (size_t)blockIdx.x * width;
    const RowDraw d = draws[blockIdx.x];
    if (d.temperature <= 0.f || d.top_k == 1) {
        int i = block_argmax(r, width);
        if (threadIdx.x == 0) out[blockIdx.x] = i;
        return;
    }
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    float m = NEG_INF;
    for (int i = threadIdx.x; i < width; i += blockDim.x) m = fmaxf(m, r[i]);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
    if (lane == 0) scan[warp] = m;
    __syncthreads();
    m = NEG_INF;
    for (int w = 0; w < warps; ++w) m = fmaxf(m, scan[w]);
    const float inv_t = 1.f / d.temperature;

    u32 cut = 0;
    if (d.top_k > 0 && d.top_k < (u32)width) cut = radix_cut(r, width, 0, false, (float)d.top_k, m, inv_t, red, tot);
    if (d.top_p < 1.f) {
        float kept = 0.f;
        for (int i = threadIdx.x; i < width; i += blockDim.x)
            if (order_key(r[i]) >= cut) kept += __expf((r[i] - m) * inv_t);
        float v[16] = {kept};
        block_sum16(v, red, tot);
        cut = radix_cut(r, width, cut, true, d.top_p * tot[0], m, inv_t, red, tot);
    }

    // Inverse CDF in index order: each thread sums its own run of indices, a scan over the
    // threads finds the run holding u * total, and that thread walks it.
    const int run = (width + blockDim.x - 1) / blockDim.x;
    const int lo = min(width, (int)threadIdx.x * run), hi = min(width, lo + run);
    float mine = 0.f;
    for (int i = lo; i < hi; ++i)
        if (order_key(r[i]) >= cut) mine += __expf((r[i] - m) * inv_t);
    float incl = mine;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        float y = __shfl_up_sync(0xffffffffu, incl, o);
        if (lane >= o) incl += y;
    }
    __syncthreads();
    if (lane == 31) scan[warp] = incl;
    if (threadIdx.x == 0) picked = -1;
    __syncthreads();
    float before = 0.f, total = 0.f;
    for (int w = 0; w < warps; ++w) {
        if (w < warp) before += scan[w];
        total += scan[w];
    }
    const float start = before + incl - mine, target = d.u * total;
    if (mine > 0.f && start <= target && target < start + mine) {
        float acc = start;
        int last = -1;
        for (int i = lo; i < hi; ++i)
            if (order_key(r[i]) >= cut) {
                acc += __expf((r[i] - m) * inv_t);
                last = i;
                if (acc > target) break;
            }
        atomicMax(&picked, last);
    }
    __syncthreads();
    if (picked < 0) {
        // Rounding put the target past the last kept token: take that token.
        int last = -1;
        for (int i = threadIdx.x; i < width; i += blockDim.x)
            if (order_key(r[i]) >= cut) last = i;
        atomicMax(&picked, last);
        __syncthreads();
    }
    if (threadIdx.x == 0) out[blockIdx.x] = picked < 0 ? 0 : picked;
}

extern "C" __global__ void gather_rows(const float* x, const u32* rows, float* out, int width) {
    const float* src = x + (size_t)rows[blockIdx.x] * width;
    float* dst = out + (size_t)blockIdx.x * width;
    for (int i = threadIdx.x; i < width; i += blockDim.x) dst[i] = src[i];
}

// KV cache layout, for K and for V alike: [layer][block][kv_head][token][head_dim].
struct KvGeom {
    int blocks, block_tokens, kv_heads, head_dim;
};

__device__ __forceinline__ size_t kv_offset(KvGeom g, int layer, u32 block, int head, u32 token) {
    return ((((size_t)layer * g.blocks + block) * g.kv_heads + head) * g.block_tokens + token) * g.head_dim;
}

// One block per row; `slots` holds (block, token) pairs, block 0xffffffff for rows stored elsewhere.
extern "C" __global__ void kv_write(bf16* k, bf16* v, const float* src, const u32* slots, KvGeom g,
                                    int layer, int row_width, int k_col, int v_col) {
    u32 block = slots[2 * blockIdx.x], token = slots[2 * blockIdx.x + 1];
    if (block == 0xffffffffu) return;
    const float* row = src + (size_t)blockIdx.x * row_width;
    for (int i = threadIdx.x; i < g.kv_heads * g.head_dim; i += blockDim.x) {
        int h = i / g.head_dim, d = i % g.head_dim;
        size_t at = kv_offset(g, layer, block, h, token) + d;
        k[at] = f32_to_bf16(row[k_col + i]);
        v[at] = f32_to_bf16(row[v_col + i]);
    }
}

// Paged MicroAttention, split over the KV length (flash-decoding).
//
// Grid: (slot, kv head, split); slot i serves query row `slot_rows[2 * i]` of sequence
// `slot_rows[2 * i + 1]` (rows of no sequence point at an empty one). Each block of 4 warps serves the G query heads that share
// the kv head, so a KV token is read once per group. Within a warp, LPT = head_dim / 8 lanes hold
// one token (16 bytes of K and of V each, one load apiece), so a warp covers 32 / LPT tokens per
// pass and a dot product needs log2(LPT) shuffles. Each lane group keeps its own online softmax
// over its tokens; groups, then warps, are merged at the end. The block writes, per query head of
// its group, the normalised partial output and its log-sum-exp; `attn_merge` combines the splits.
//
// Metadata: `seqs[4 * s ..]` is (first_row, first_row_pos,
// first_segment, segments); `segs[3 * i ..]` is (block, first_pos, tokens).
#define WARPS 4
#define PASSES 4

__device__ __forceinline__ void unpack8(uint4 w, float* out) {
    const u32 words[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        out[2 * i] = __uint_as_float(words[i] << 16);
        out[2 * i + 1] = __uint_as_float(words[i] & 0xffff0000u);
    }
}

// Folds the softmax state (m2, l2, acc2) into (m, l, acc).
template <int G>
__device__ __forceinline__ void fold(float* m, float* l, float (*acc)[8], const float* m2, const float* l2,
                                     const float (*acc2)[8]) {
#pragma unroll
    for (int g = 0; g < G; ++g) {
        float mx = fmaxf(m[g], m2[g]);
        float f1 = m[g] == NEG_INF ? 0.f : __expf(m[g] - mx);
        float f2 = m2[g] == NEG_INF ? 0.f : __expf(m2[g] - mx);
        l[g] = l[g] * f1 + l2[g] * f2;
#pragma unroll
        for (int i = 0; i < 8; ++i) acc[g][i] = acc[g][i] * f1 + acc2[g][i] * f2;
        m[g] = mx;
    }
}

template <int LPT, int G>
__device__ void attn_split(const float* q, int q_width, int q_col, const bf16* kc, const bf16* vc,
                           KvGeom geo, int layer, float scale, const u32* slot_rows, const u32* seqs,
                           const u32* segs, int segs_per_split, float* part_o, float* part_lse,
                           int splits) {
    constexpr int HD = LPT * 8, TPP = 32 / LPT, STEP = TPP * PASSES;
    const int slot = blockIdx.x, kvh = blockIdx.y, split = blockIdx.z;
    const u32 row = slot_rows[2 * slot];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int grp = lane / LPT, sub = lane % LPT;
    const int q_heads = geo.kv_heads * G;
    const u32* sq = seqs + 4 * slot_rows[2 * slot + 1];
    const u32 row_pos = sq[1] + (row - sq[0]);
    const int seg_lo = sq[2] + split * segs_per_split;
    const int seg_hi = min((int)(sq[2] + sq[3]), seg_lo + segs_per_split);

    float qr[G][8];
#pragma unroll
    for (int g = 0; g < G; ++g)
#pragma unroll
        for (int i = 0; i < 8; ++i)
            qr[g][i] = q[(size_t)row * q_width + q_col + (kvh * G + g) * HD + sub * 8 + i] * scale;

    float m[G], l[G], acc[G][8];
#pragma unroll
    for (int g = 0; g < G; ++g) {
        m[g] = NEG_INF;
        l[g] = 0.f;
#pragma unroll
        for (int i = 0; i < 8; ++i) acc[g][i] = 0.f;
    }

    // Whole segments go to warps in turn; each warp fetches its next segment's entry before
    // reading the current one's KV, so the table's latency hides behind the data's.
    int s = seg_lo + warp;
    uint3 next = s < seg_hi ? make_uint3(segs[3 * s], segs[3 * s + 1], segs[3 * s + 2]) : make_uint3(0, 0, 0);
    for (; s < seg_hi; s += WARPS) {
        const u32 block = next.x, first = next.y, n = next.z;
        if (s + WARPS < seg_hi)
            next = make_uint3(segs[3 * (s + WARPS)], segs[3 * (s + WARPS) + 1], segs[3 * (s + WARPS) + 2]);
        if (first > row_pos) continue;  // wholly in this row's future
        u32 visible = min(n, row_pos - first + 1);
        const bf16* kb = kc + kv_offset(geo, layer, block, kvh, 0) + sub * 8;
        const bf16* vb = vc + kv_offset(geo, layer, block, kvh, 0) + sub * 8;
        for (u32 t0 = 0; t0 < visible; t0 += STEP) {
            float kf[PASSES][8], vf[PASSES][8];
            bool ok[PASSES];
#pragma unroll
            for (int u = 0; u < PASSES; ++u) {
                u32 t = t0 + u * TPP + grp;
                ok[u] = t < visible;
                if (!ok[u]) t = t0;
                unpack8(*reinterpret_cast<const uint4*>(kb + (size_t)t * HD), kf[u]);
                unpack8(*reinterpret_cast<const uint4*>(vb + (size_t)t * HD), vf[u]);
            }
#pragma unroll
            for (int g = 0; g < G; ++g) {
                float sc[PASSES];
                float mx = m[g];
#pragma unroll
                for (int u = 0; u < PASSES; ++u) {
                    float d = 0.f;
#pragma unroll
                    for (int i = 0; i < 8; ++i) d += qr[g][i] * kf[u][i];
#pragma unroll
                    for (int o = LPT / 2; o > 0; o >>= 1) d += __shfl_xor_sync(0xffffffffu, d, o);
                    sc[u] = ok[u] ? d : NEG_INF;
                    mx = fmaxf(mx, sc[u]);
                }
                if (mx == NEG_INF) continue;  // this lane group has no token in the step yet
                float corr = __expf(m[g] - mx);
                l[g] *= corr;
#pragma unroll
                for (int i = 0; i < 8; ++i) acc[g][i] *= corr;
#pragma unroll
                for (int u = 0; u < PASSES; ++u) {
                    float p = ok[u] ? __expf(sc[u] - mx) : 0.f;
                    l[g] += p;
#pragma unroll
                    for (int i = 0; i < 8; ++i) acc[g][i] += p * vf[u][i];
                }
                m[g] = mx;
            }
        }
    }

    // Merge the lane groups of the warp: the lanes with the same dims, LPT apart.
#pragma unroll
    for (int o = LPT; o < 32; o <<= 1) {
        float m2[G], l2[G], acc2[G][8];
#pragma unroll
        for (int g = 0; g < G; ++g) {
            m2[g] = __shfl_xor_sync(0xffffffffu, m[g], o);
            l2[g] = __shfl_xor_sync(0xffffffffu, l[g], o);
#pragma unroll
            for (int i = 0; i < 8; ++i) acc2[g][i] = __shfl_xor_sync(0xffffffffu, acc[g][i], o);
        }
        fold<G>(m, l, acc, m2, l2, acc2);
    }

    // Merge the warps through shared memory.
    __shared__ float sm_m[WARPS][G], sm_l[WARPS][G];
    __shared__ float sm_acc[WARPS][G][HD];
    if (lane == 0)
#pragma unroll
        for (int g = 0; g < G; ++g) {
            sm_m[warp][g] = m[g];
            sm_l[warp][g] = l[g];
        }
    if (grp == 0)
#pragma unroll
        for (int g = 0; g < G; ++g)
#pragma unroll
            for (int i = 0; i < 8; ++i) sm_acc[warp][g][sub * 8 + i] = acc[g][i];
    __syncthreads();
    for (int i = threadIdx.x; i < G * HD; i += blockDim.x) {
        int g = i / HD, d = i % HD;
        float mx = NEG_INF;
        for (int w = 0; w < WARPS; ++w) mx = fmaxf(mx, sm_m[w][g]);
        float tl = 0.f, to = 0.f;
        if (mx != NEG_INF)
            for (int w = 0; w < WARPS; ++w) {
                if (sm_m[w][g] == NEG_INF) continue;
                float f = __expf(sm_m[w][g] - mx);
                tl += sm_l[w][g] * f;
                to += sm_acc[w][g][d] * f;
            }
        size_t at = ((size_t)slot * q_heads + kvh * G + g) * splits + split;
        part_o[at * HD + d] = tl > 0.f ? to / tl : 0.f;
        if (d == 0) part_lse[at] = tl > 0.f ? mx + __logf(tl) : NEG_INF;
    }
}

#define ATTN_KERNEL(HD, G)                                                                           \
    extern "C" __global__ void __launch_bounds__(WARPS * 32) attn_split_h##HD##_g##G(               \
        const float* q, int q_width, int q_col, const bf16* kc, const bf16* vc, KvGeom geo, int layer, \
        float scale, const u32* slot_rows, const u32* seqs, const u32* segs, int segs_per_split,    \
        float* part_o, float* part_lse, int splits) {                                                \
        attn_split<HD / 8, G>(q, q_width, q_col, kc, vc, geo, layer, scale, slot_rows, seqs, segs,   \
                              segs_per_split, part_o, part_lse, splits);                             \
    }
#define ATTN_KERNELS(HD) ATTN_KERNEL(HD, 1) ATTN_KERNEL(HD, 2) ATTN_KERNEL(HD, 4) ATTN_KERNEL(HD, 8)
ATTN_KERNELS(32)
ATTN_KERNELS(64)
ATTN_KERNELS(128)
ATTN_KERNELS(256)

// Exact merge of the splits: grid (slot, q head), one thread per dimension (blockDim.x ==
// head_dim). The block reduces the max and the sum of the splits' weights once and shares each
// weight, so a thread's loop is one multiply-add per split, unrolled to keep loads in flight.
#define MERGE_CHUNK 256
extern "C" __global__ void attn_merge(const float* part_o, const float* part_lse, const u32* slot_rows,
                                      int splits, int head_dim, float* out, float* lse) {
    __shared__ float red[32], weight[MERGE_CHUNK];
    size_t sh = (size_t)blockIdx.x * gridDim.y + blockIdx.y;
    size_t rh = (size_t)slot_rows[2 * blockIdx.x] * gridDim.y + blockIdx.y;
    const float* pl = part_lse + sh * splits;
    float mx = NEG_INF;
    for (int s = threadIdx.x; s < splits; s += blockDim.x) mx = fmaxf(mx, pl[s]);
    mx = block_reduce(mx, red, Max{});
    float part = 0.f;
    if (mx != NEG_INF)
        for (int s = threadIdx.x; s < splits; s += blockDim.x) part += __expf(pl[s] - mx);
    float total = block_sum(part, red);
    float scale = total > 0.f ? 1.f / total : 0.f;
    float o = 0.f;
    for (int first = 0; first < splits; first += MERGE_CHUNK) {
        int n = min(MERGE_CHUNK, splits - first);
        __syncthreads();
        for (int s = threadIdx.x; s < n; s += blockDim.x)
            weight[s] = scale > 0.f ? __expf(pl[first + s] - mx) * scale : 0.f;
        __syncthreads();
        const float* po = part_o + (sh * splits + first) * head_dim + threadIdx.x;
#pragma unroll 8
        for (int s = 0; s < n; ++s) o += weight[s] * po[(size_t)s * head_dim];
    }
    out[rh * head_dim + threadIdx.x] = o;
    if (threadIdx.x == 0) lse[rh] = total > 0.f ? mx + __logf(total) : NEG_INF;
}

// Folds a creditor's partial results into the home's: grid (part row, q head), one thread per
// dimension. `rows[i]` is the home row of part row i; out and lse hold the local partials.
extern "C" __global__ void attn_merge_rows(const float* part_o, const float* part_lse, const u32* rows,
                                           int head_dim, float* out, float* lse) {
    size_t ph = (size_t)blockIdx.x * gridDim.y + blockIdx.y;
    size_t rh = (size_t)rows[blockIdx.x] * gridDim.y + blockIdx.y;
    float a = lse[rh], b = part_lse[ph];
    float mx = fmaxf(a, b);
    float wa = a == NEG_INF ? 0.f : __expf(a - mx);
    float wb = b == NEG_INF ? 0.f : __expf(b - mx);
    float total = wa + wb;
    __syncthreads();
    for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
        float o = total > 0.f ? (wa * out[rh * head_dim + d] + wb * part_o[ph * head_dim + d]) / total : 0.f;
        out[rh * head_dim + d] = o;
    }
    if (threadIdx.x == 0) lse[rh] = total > 0.f ? mx + __logf(total) : NEG_INF;
}

// Paged prefill attention on tensor cores (FlashAttention-2 style), for query rows that come
// many to a sequence: a prompt chunk, or a creditor serving a long prefill's queries.
//
// Grid: (tile, kv head). A tile is up to PF_M / G consecutive query rows of one sequence; with
// the G query heads of its kv head they make PF_M rows of the product ("m-rows": m = row * G +
// head), so every KV tile loaded into shared memory serves the whole group. Each of the four
// warps owns 16 m-rows and runs mma.sync m16n8k16 (bf16 in, f32 out): S = Q K^T, an online
// softmax in registers (base 2, the scale folded into Q), then O += P V with P re-packed from
// S's accumulators as the A operand. K and V tiles cover PF_N token slots: PF_N / block_tokens
// whole segments, so a slot maps to (segment, token) without a search. Tiles are double-buffered
// with cp.async: tile t + 1 loads while tile t is computed. Shared memory is dynamic
// (PF_STAGE(HD) bf16 per stage, two stages): more than the 48 KB a static array may take.
//
// `tiles[3 * i ..]` is (sequence, first row in the sequence, rows); the other tables are those
// of `attn_split`. Segments past the last one the tile's rows can see are not loaded.
#define PF_M 64
#define PF_N 64

// Two values to bf16 (round to nearest even) in one instruction, `lo` in the low half.
__device__ __forceinline__ u32 pack_bf16(float lo, float hi) {
    u32 r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;\n" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}

// 2^x without exp2f's range handling: inputs are <= 0 here, and -inf gives 0.
__device__ __forceinline__ float fast_exp2(float x) {
    float r;
    asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(r) : "f"(x));
    return r;
}

__device__ __forceinline__ void mma_bf16(float* c, const u32* a, u32 b0, u32 b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ u32 smem_addr(const void* p) {
    u32 a;
    asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(p));
    return a;
}

// Four 8x8 bf16 matrices from shared memory; lane i names row i % 8 of matrix i / 8.
__device__ __forceinline__ void ldsm_x4(u32* r, const bf16* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(p)));
}

// The same, each matrix transposed: turns row-major V into mma's B operand.
__device__ __forceinline__ void ldsm_x4_t(u32* r, const bf16* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(p)));
}

// 16 bytes from global to shared memory without passing through registers; `bytes` 0 writes
// zeros (an empty slot).
__device__ __forceinline__ void cp_async16(void* dst, const void* src, int bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src), "r"(bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_group 0;\n" ::); }

// Shared memory of the prefill kernel, in bf16 units: two stages of K and V tiles.
#define PF_STAGE(HD) (2 * PF_N * ((HD) + 8))

template <int HD, int G>
__device__ void attn_prefill(const float* q, int q_width, int q_col, const bf16* kc, const bf16* vc,
                             KvGeom geo, int layer, float scale, const u32* tiles, int n_tiles,
                             const u32* seqs, const u32* segs, float* out, float* lse) {
    constexpr int KCH = HD / 16;      // k-steps of Q K^T
    constexpr int NT = HD / 8;        // n-tiles of O
    constexpr int ST = HD + 8;        // padded shared row: ldmatrix rows fall in distinct banks
    constexpr int CH = HD / 8;        // 16-byte chunks per row
    extern __shared__ __align__(16) bf16 pf_smem[];
    __shared__ long long slot_at[2][PF_N];  // cache offset of each slot's token, -1 when empty
    __shared__ int slot_pos[2][PF_N];
    __shared__ int seg_end;

    // Later tiles see more KV: start them first so the grid's tail is short.
    const int tile = n_tiles - 1 - blockIdx.x, kvh = blockIdx.y;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int gq = lane >> 2, tig = lane & 3;
    const u32* sq = seqs + 4 * tiles[3 * tile];
    const u32 row0 = sq[0] + tiles[3 * tile + 1], pos0 = sq[1] + tiles[3 * tile + 1];
    const int rows = tiles[3 * tile + 2];
    const int q_heads = geo.kv_heads * G;
    const int bt = geo.block_tokens, segs_per_tile = PF_N / bt;
    const int seg_lo = sq[2], seg_hi = sq[2] + sq[3];
    const u32 last_pos = pos0 + rows - 1;

    // Segments past the last one that holds a token this tile's rows see are not loaded.
    if (threadIdx.x == 0) seg_end = seg_lo;
    __syncthreads();
    int mine = seg_lo;
    for (int s = seg_lo + threadIdx.x; s < seg_hi; s += blockDim.x)
        if (segs[3 * s + 1] <= last_pos) mine = s + 1;
    atomicMax(&seg_end, mine);
    __syncthreads();
    const int kv_tiles = (seg_end - seg_lo + segs_per_tile - 1) / segs_per_tile;

    // Threads below PF_N describe one slot of KV tile `t` for buffer `b`; the result says
    // whether that slot holds a token every row of the tile sees (threads past PF_N say yes),
    // so that a barrier can tell whether the whole KV tile needs no mask.
    auto describe = [&](int t, int b) {
        bool seen = true;
        if (threadIdx.x < PF_N) {
            const int slot = threadIdx.x, s = seg_lo + t * segs_per_tile + slot / bt;
            const u32 tok = slot % bt;
            long long at = -1;
            int pos = -1;
            if (s < seg_end && tok < segs[3 * s + 2]) {
                at = (long long)kv_offset(geo, layer, segs[3 * s], kvh, tok);
                pos = segs[3 * s + 1] + tok;
            }
            slot_at[b][slot] = at;
            slot_pos[b][slot] = pos;
            seen = pos >= 0 && pos <= (int)pos0;
        }
        return seen;
    };
    auto load = [&](int b) {
        bf16* ks = pf_smem + b * PF_STAGE(HD);
        bf16* vs = ks + PF_N * ST;
        for (int i = threadIdx.x; i < PF_N * CH; i += blockDim.x) {
            const int slot = i / CH, c = i % CH;
            const long long at = slot_at[b][slot];
            const size_t from = at < 0 ? 0 : (size_t)at + c * 8;
            cp_async16(ks + slot * ST + c * 8, kc + from, at < 0 ? 0 : 16);
            cp_async16(vs + slot * ST + c * 8, vc + from, at < 0 ? 0 : 16);
        }
        cp_async_commit();
    };

    // This lane's two m-rows of its warp's 16: gq and gq + 8.
    int r_of[2], h_of[2];
    bool live[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        int m = warp * 16 + gq + 8 * i;
        r_of[i] = m / G;
        h_of[i] = kvh * G + m % G;
        live[i] = r_of[i] < rows;
    }

    bool unmasked = false;  // the current KV tile is seen whole by every row
    if (kv_tiles > 0) {
        unmasked = __syncthreads_and(describe(0, 0));
        load(0);
    }

    // Q as A fragments, scaled by scale * log2(e) for exp2; read while the first tile loads.
    const float qs = scale * 1.4426950408889634f;
    u32 qa[KCH][4];
#pragma unroll
    for (int k = 0; k < KCH; ++k)
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            int i = j & 1, col = k * 16 + (j >> 1) * 8 + 2 * tig;
            qa[k][j] = 0;
            if (live[i]) {
                const float2 p = *reinterpret_cast<const float2*>(
                    q + (size_t)(row0 + r_of[i]) * q_width + q_col + h_of[i] * HD + col);
                qa[k][j] = pack_bf16(p.x * qs, p.y * qs);
            }
        }

    float o[NT][4], m[2] = {NEG_INF, NEG_INF}, l[2] = {0.f, 0.f};
#pragma unroll
    for (int n = 0; n < NT; ++n)
#pragma unroll
        for (int j = 0; j < 4; ++j) o[n][j] = 0.f;

    for (int t = 0; t < kv_tiles; ++t) {
        const int b = t & 1;
        const bool next_seen = t + 1 < kv_tiles ? describe(t + 1, b ^ 1) : true;
        cp_async_wait_all();
        // Tile t is in shared memory, and tile t + 1's slots are described.
        const bool next_unmasked = __syncthreads_and(next_seen);
        if (t + 1 < kv_tiles) load(b ^ 1);  // lands while tile t is computed
        const bf16* ks = pf_smem + b * PF_STAGE(HD);
        const bf16* vs = ks + PF_N * ST;

        float s[PF_N / 8][4];
#pragma unroll
        for (int n = 0; n < PF_N / 8; ++n) {
#pragma unroll
            for (int j = 0; j < 4; ++j) s[n][j] = 0.f;
#pragma unroll
            for (int k = 0; k < KCH; k += 2) {
                u32 f[4];
                ldsm_x4(f, ks + (n * 8 + (lane & 7)) * ST + k * 16 + (lane >> 3) * 8);
                mma_bf16(s[n], qa[k], f[0], f[1]);
                mma_bf16(s[n], qa[k + 1], f[2], f[3]);
            }
        }

        // Mask (empty slots, the future), then the online softmax of each of the two m-rows.
#pragma unroll
        for (int i = 0; i < 2; ++i) {
            const int rpos = live[i] ? (int)(pos0 + r_of[i]) : -1;
            float mx = m[i];
#pragma unroll
            for (int n = 0; n < PF_N / 8; ++n)
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    if (!unmasked || !live[i]) {
                        int p = slot_pos[b][n * 8 + 2 * tig + e];
                        if (p < 0 || p > rpos) s[n][2 * i + e] = NEG_INF;
                    }
                    mx = fmaxf(mx, s[n][2 * i + e]);
                }
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
            const float base = mx == NEG_INF ? 0.f : mx;
            const float corr = fast_exp2(m[i] - base);
            l[i] *= corr;
#pragma unroll
            for (int n = 0; n < NT; ++n) {
                o[n][2 * i] *= corr;
                o[n][2 * i + 1] *= corr;
            }
#pragma unroll
            for (int n = 0; n < PF_N / 8; ++n)
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    float p = fast_exp2(s[n][2 * i + e] - base);
                    s[n][2 * i + e] = p;
                    l[i] += p;
                }
            m[i] = mx;
        }

        // O += P V: the accumulators of two n-tiles of S are one k-step's A fragment.
#pragma unroll
        for (int k = 0; k < PF_N / 16; ++k) {
            u32 pa[4] = {pack_bf16(s[2 * k][0], s[2 * k][1]), pack_bf16(s[2 * k][2], s[2 * k][3]),
                         pack_bf16(s[2 * k + 1][0], s[2 * k + 1][1]),
                         pack_bf16(s[2 * k + 1][2], s[2 * k + 1][3])};
#pragma unroll
            for (int n = 0; n < NT; n += 2) {
                u32 f[4];
                const int mat = lane >> 3;
                ldsm_x4_t(f, vs + (k * 16 + (mat & 1) * 8 + (lane & 7)) * ST + n * 8 + (mat >> 1) * 8);
                mma_bf16(o[n], pa, f[0], f[1]);
                mma_bf16(o[n + 1], pa, f[2], f[3]);
            }
        }
        __syncthreads();  // buffer b is free for tile t + 2
        unmasked = next_unmasked;
    }

    // The four lanes of a row hold parts of its sum; then normalise and write.
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        float t = l[i];
        t += __shfl_xor_sync(0xffffffffu, t, 1);
        t += __shfl_xor_sync(0xffffffffu, t, 2);
        if (!live[i]) continue;
        const size_t rh = (size_t)(row0 + r_of[i]) * q_heads + h_of[i];
        const float inv = t > 0.f ? 1.f / t : 0.f;
#pragma unroll
        for (int n = 0; n < NT; ++n) {
            float2 v = make_float2(o[n][2 * i] * inv, o[n][2 * i + 1] * inv);
            *reinterpret_cast<float2*>(out + rh * HD + n * 8 + 2 * tig) = v;
        }
        if (tig == 0) lse[rh] = t > 0.f ? (m[i] + __log2f(t)) * 0.6931471805599453f : NEG_INF;
    }
}

#define PREFILL_KERNEL(HD, G)                                                                       \
    extern "C" __global__ void __launch_bounds__(128, 3) attn_prefill_h##HD##_g##G(                    \
        const float* q, int q_width, int q_col, const bf16* kc, const bf16* vc, KvGeom geo, int layer, \
        float scale, const u32* tiles, int n_tiles, const u32* seqs, const u32* segs, float* out,   \
        float* lse) {                                                                                \
        attn_prefill<HD, G>(q, q_width, q_col, kc, vc, geo, layer, scale, tiles, n_tiles, seqs, segs, \
                            out, lse);                                                               \
    }
#define PREFILL_KERNELS(HD) PREFILL_KERNEL(HD, 1) PREFILL_KERNEL(HD, 2) PREFILL_KERNEL(HD, 4) PREFILL_KERNEL(HD, 8)
PREFILL_KERNELS(64)
PREFILL_KERNELS(128)
