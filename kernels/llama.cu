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

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// Sum over the whole block; `red` holds one float per warp.
__device__ float block_sum(float v, float* red) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) red[warp] = v;
    __syncthreads();
    float t = 0.f;
    for (int w = 0; w < warps; ++w) t += red[w];
    return t;
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

// One block per row.
extern "C" __global__ void rms_norm(const float* x, const bf16* w, float* out, int width, float eps) {
    __shared__ float red[32];
    const float* xr = x + (size_t)blockIdx.x * width;
    float* o = out + (size_t)blockIdx.x * width;
    float ss = 0.f;
    for (int i = threadIdx.x; i < width; i += blockDim.x) ss += xr[i] * xr[i];
    float inv = rsqrtf(block_sum(ss, red) / width + eps);
    for (int i = threadIdx.x; i < width; i += blockDim.x) o[i] = xr[i] * inv * bf16_to_f32(w[i]);
}

// acc += x, then out = rms_norm(acc) * w; one block per row. Each thread reads back only the
// values it wrote, so the two passes need no barrier beyond the reduction's.
extern "C" __global__ void add_rms_norm(float* acc, const float* x, const bf16* w, float* out, int width,
                                        float eps) {
    __shared__ float red[32];
    float* a = acc + (size_t)blockIdx.x * width;
    const float* xr = x + (size_t)blockIdx.x * width;
    float* o = out + (size_t)blockIdx.x * width;
    float ss = 0.f;
    for (int i = threadIdx.x; i < width; i += blockDim.x) {
        float v = a[i] + xr[i];
        a[i] = v;
        ss += v * v;
    }
    float inv = rsqrtf(block_sum(ss, red) / width + eps);
    for (int i = threadIdx.x; i < width; i += blockDim.x) o[i] = a[i] * inv * bf16_to_f32(w[i]);
}

// Half-split rotation of the first `heads` heads of each row, in place; one block per row.
extern "C" __global__ void rope(float* x, const u32* positions, const float* inv_freq, int row_width,
                                int heads, int head_dim) {
    float* r = x + (size_t)blockIdx.x * row_width;
    float pos = (float)positions[blockIdx.x];
    int half = head_dim / 2;
    for (int i = threadIdx.x; i < heads * half; i += blockDim.x) {
        int h = i / half, j = i % half;
        float s, c;
        sincosf(pos * inv_freq[j], &s, &c);
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

// Greedy choice per row: one block per row; ties go to the lowest index, NaN never wins.
extern "C" __global__ void argmax_rows(const float* x, u32* out, int width) {
    __shared__ float best_v[32];
    __shared__ int best_i[32];
    const float* r = x + (size_t)blockIdx.x * width;
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
        // A row of NaN or -inf only: the first index, as the host's argmax.
        out[blockIdx.x] = idx < width ? idx : 0;
    }
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
// Grid: (query row, kv head, split). Each block of 4 warps serves the G query heads that share
// the kv head, so a KV token is read once per group. Within a warp, LPT = head_dim / 8 lanes hold
// one token (16 bytes of K and of V each, one load apiece), so a warp covers 32 / LPT tokens per
// pass and a dot product needs log2(LPT) shuffles. Each lane group keeps its own online softmax
// over its tokens; groups, then warps, are merged at the end. The block writes, per query head of
// its group, the normalised partial output and its log-sum-exp; `attn_merge` combines the splits.
//
// Metadata: `row_seq[row]` names the row's sequence; `seqs[4 * s ..]` is (first_row, first_row_pos,
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
                           KvGeom geo, int layer, float scale, const u32* row_seq, const u32* seqs,
                           const u32* segs, int segs_per_split, float* part_o, float* part_lse,
                           int splits) {
    constexpr int HD = LPT * 8, TPP = 32 / LPT, STEP = TPP * PASSES;
    const int row = blockIdx.x, kvh = blockIdx.y, split = blockIdx.z;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int grp = lane / LPT, sub = lane % LPT;
    const int q_heads = geo.kv_heads * G;
    const u32* sq = seqs + 4 * row_seq[row];
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
        size_t at = ((size_t)row * q_heads + kvh * G + g) * splits + split;
        part_o[at * HD + d] = tl > 0.f ? to / tl : 0.f;
        if (d == 0) part_lse[at] = tl > 0.f ? mx + __logf(tl) : NEG_INF;
    }
}

#define ATTN_KERNEL(HD, G)                                                                           \
    extern "C" __global__ void __launch_bounds__(WARPS * 32) attn_split_h##HD##_g##G(               \
        const float* q, int q_width, int q_col, const bf16* kc, const bf16* vc, KvGeom geo, int layer, \
        float scale, const u32* row_seq, const u32* seqs, const u32* segs, int segs_per_split,      \
        float* part_o, float* part_lse, int splits) {                                                \
        attn_split<HD / 8, G>(q, q_width, q_col, kc, vc, geo, layer, scale, row_seq, seqs, segs,     \
                              segs_per_split, part_o, part_lse, splits);                             \
    }
#define ATTN_KERNELS(HD) ATTN_KERNEL(HD, 1) ATTN_KERNEL(HD, 2) ATTN_KERNEL(HD, 4) ATTN_KERNEL(HD, 8)
ATTN_KERNELS(32)
ATTN_KERNELS(64)
ATTN_KERNELS(128)
ATTN_KERNELS(256)

// Exact merge of the splits: grid (row, q head), one thread per dimension.
extern "C" __global__ void attn_merge(const float* part_o, const float* part_lse, int splits, int head_dim,
                                      float* out, float* lse) {
    size_t rh = (size_t)blockIdx.x * gridDim.y + blockIdx.y;
    const float* pl = part_lse + rh * splits;
    float mx = NEG_INF;
    for (int s = 0; s < splits; ++s) mx = fmaxf(mx, pl[s]);
    float total = 0.f;
    if (mx != NEG_INF)
        for (int s = 0; s < splits; ++s) total += __expf(pl[s] - mx);
    for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
        float o = 0.f;
        if (total > 0.f)
            for (int s = 0; s < splits; ++s) o += __expf(pl[s] - mx) / total * part_o[(rh * splits + s) * head_dim + d];
        out[rh * head_dim + d] = o;
    }
    if (threadIdx.x == 0) lse[rh] = total > 0.f ? mx + __logf(total) : NEG_INF;
}
