// Paged decode attention on CPU: one query token per sequence, K/V read in place through the
// block table (no gather into a workspace). Plain C ABI, called through ctypes by
// fast/attention/cpu_backend.py, which checks every argument first; no torch headers, so the
// build takes seconds.
//
// Cache layout: k_cache, v_cache [num_blocks, block_size, num_kv_heads, head_dim], contiguous;
// the token at position p of sequence b, kv head h, is the row
//     ((block_tables[b, p / block_size] * block_size + p % block_size) * num_kv_heads + h) * head_dim
//
// Work item = (sequence, kv head), spread over OpenMP threads (torch's own libgomp: same soname,
// already loaded). Each item holds its GROUP query heads in fp32 and walks the sequence's visible
// positions block by block with an online softmax (fp32): scores of the block's tokens for every
// query head, then one rescale of the accumulators per block, then p·V.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace {

struct bf16_t {
  uint16_t bits;
};

inline float to_float(float x) { return x; }
inline float to_float(_Float16 x) { return static_cast<float>(x); }
inline float to_float(bf16_t x) {
  uint32_t u = static_cast<uint32_t>(x.bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline void store(float x, float* dst) { *dst = x; }
inline void store(float x, _Float16* dst) { *dst = static_cast<_Float16>(x); }  // round to nearest even
inline void store(float x, bf16_t* dst) {  // round to nearest even, like torch
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  if ((u & 0x7fffffffu) > 0x7f800000u) {
    dst->bits = 0x7fc0;
    return;
  }
  u += 0x7fffu + ((u >> 16) & 1u);
  dst->bits = static_cast<uint16_t>(u >> 16);
}

// exp(x) for x <= 0 (Cephes expf: range reduction by ln 2, degree-5 polynomial; ~1 ulp), written
// so that gcc vectorizes a loop of it; libm's expf would stay scalar without -ffast-math.
inline float exp_nonpositive(float x) {
  x = std::max(x, -87.0f);
  const float fx = std::floor(x * 1.44269504088896341f + 0.5f);
  x = x - fx * 0.693359375f + fx * 2.12194440e-4f;
  const float z = x * x;
  float y = 1.9875691500e-4f;
  y = y * x + 1.3981999507e-3f;
  y = y * x + 8.3334519073e-3f;
  y = y * x + 4.1665795894e-2f;
  y = y * x + 1.6666665459e-1f;
  y = y * x + 5.0000001201e-1f;
  y = y * z + x + 1.0f;
  const uint32_t bits = static_cast<uint32_t>(static_cast<int32_t>(fx) + 127) << 23;
  float pow2n;
  std::memcpy(&pow2n, &bits, sizeof pow2n);
  return y * pow2n;
}

struct DecodeArgs {
  const void* q;
  const void* k_cache;
  const void* v_cache;
  void* out;
  const int64_t* query_rows;    // [num_seqs]: the row of q / out of each sequence's query
  const int64_t* seq_lens;      // [num_seqs]
  const int64_t* block_tables;  // [num_seqs, block_table_stride]
  int64_t block_table_stride;
  int64_t q_stride_token, q_stride_head, out_stride_token, out_stride_head;  // in elements
  int64_t num_seqs, num_kv_heads, group, head_dim, block_size;
  float scale;
  int64_t sliding_window;  // 0: none
  int num_threads;
};

// A cache row as fp32: the row itself for fp32, else converted into `buffer`.
template <typename T>
inline const float* row_as_float(const T* row, float* buffer, int64_t head_dim) {
  if constexpr (std::is_same_v<T, float>) {
    return row;
  } else {
#pragma omp simd
    for (int64_t d = 0; d < head_dim; ++d) buffer[d] = to_float(row[d]);
    return buffer;
  }
}

// HEAD_DIM > 0 fixes head_dim at compile time (fully unrolled row loops: at D = 64 the loop
// overhead of a runtime trip count cost more than the arithmetic); 0 reads it from the arguments.
template <typename T, int HEAD_DIM>
void decode(const DecodeArgs& a) {
  const int64_t G = a.group, BS = a.block_size, H = a.num_kv_heads;
  const int64_t D = HEAD_DIM > 0 ? HEAD_DIM : a.head_dim;
  const int64_t token_stride = H * D;  // between consecutive positions of one kv head in the cache
  const int64_t items = a.num_seqs * H;
  const T* k_cache = static_cast<const T*>(a.k_cache);
  const T* v_cache = static_cast<const T*>(a.v_cache);
#pragma omp parallel num_threads(a.num_threads)
  {
    std::vector<float> q(G * D), acc(G * D), scores(G * BS), k_buf(BS * D), v_buf(BS * D), m(G), l(G);
    std::vector<const float*> k_ptrs(BS), v_ptrs(BS);
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < items; ++item) {
      const int64_t b = item / H, h = item % H;
      const int64_t seq_len = a.seq_lens[b];
      const int64_t start = a.sliding_window > 0 ? std::max<int64_t>(0, seq_len - a.sliding_window) : 0;
      const T* q_in = static_cast<const T*>(a.q) + a.query_rows[b] * a.q_stride_token + h * G * a.q_stride_head;
      for (int64_t g = 0; g < G; ++g) {
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) q[g * D + d] = to_float(q_in[g * a.q_stride_head + d]) * a.scale;
        m[g] = -INFINITY;
        l[g] = 0.0f;
      }
      std::fill(acc.begin(), acc.end(), 0.0f);
      const int64_t* table = a.block_tables + b * a.block_table_stride;
      for (int64_t blk = start / BS; blk * BS < seq_len; ++blk) {
        const int64_t first = std::max(start, blk * BS) - blk * BS;  // offsets [first, last) in the block
#ifdef PAGEDLM_PLANTED_OFF_BY_ONE  // tests only: a build that misses each sequence's newest position
        const int64_t last = std::min(seq_len - 1, (blk + 1) * BS) - blk * BS;
#else
        const int64_t last = std::min(seq_len, (blk + 1) * BS) - blk * BS;
#endif
        const int64_t n = last - first;
        const int64_t base = ((table[blk] * BS + first) * H + h) * D;
        const T* k_rows = k_cache + base;
        const T* v_rows = v_cache + base;
        if ((blk + 1) * BS < seq_len) {  // the next block lies elsewhere: prefetch this head's rows of it
          const int64_t next = (table[blk + 1] * BS * H + h) * D;
          for (int64_t t = 0; t < BS; ++t) {
            for (int64_t byte = 0; byte < D * static_cast<int64_t>(sizeof(T)); byte += 64) {
              __builtin_prefetch(reinterpret_cast<const char*>(k_cache + next + t * token_stride) + byte);
              __builtin_prefetch(reinterpret_cast<const char*>(v_cache + next + t * token_stride) + byte);
            }
          }
        }
        // This block's rows as fp32 (in place for an fp32 cache, else converted into the buffers).
        for (int64_t t = 0; t < n; ++t) {
          k_ptrs[t] = row_as_float(k_rows + t * token_stride, k_buf.data() + t * D, D);
          v_ptrs[t] = row_as_float(v_rows + t * token_stride, v_buf.data() + t * D, D);
        }
        for (int64_t g = 0; g < G; ++g) {  // scores[g, t] = q_g · k_t (q pre-scaled); q_g stays in registers
          const float* __restrict__ qg = q.data() + g * D;
          for (int64_t t = 0; t < n; ++t) {
            const float* __restrict__ k = k_ptrs[t];
            float s = 0.0f;
#pragma omp simd reduction(+ : s)
            for (int64_t d = 0; d < D; ++d) s += qg[d] * k[d];
            scores[g * BS + t] = s;
          }
        }
        for (int64_t g = 0; g < G; ++g) {  // online softmax: new max, rescale, p = exp(s - max)
          float* sg = scores.data() + g * BS;
          float block_max = m[g];
          for (int64_t t = 0; t < n; ++t) block_max = std::max(block_max, sg[t]);
          float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
          for (int64_t t = 0; t < n; ++t) {
            const float p = exp_nonpositive(sg[t] - block_max);
            sg[t] = p;
            sum += p;
          }
          if (block_max != m[g]) {
            const float alpha = m[g] == -INFINITY ? 0.0f : std::exp(m[g] - block_max);
            float* ag = acc.data() + g * D;
#pragma omp simd
            for (int64_t d = 0; d < D; ++d) ag[d] *= alpha;
            l[g] *= alpha;
            m[g] = block_max;
          }
          l[g] += sum;
        }
        for (int64_t g = 0; g < G; ++g) {  // acc[g] += p[g, t] * v_t; acc[g] stays in registers
          float* __restrict__ ag = acc.data() + g * D;
          const float* __restrict__ pg = scores.data() + g * BS;
          for (int64_t t = 0; t < n; ++t) {
            const float p = pg[t];
            const float* __restrict__ v = v_ptrs[t];
#pragma omp simd
            for (int64_t d = 0; d < D; ++d) ag[d] += p * v[d];
          }
        }
      }
      T* out = static_cast<T*>(a.out) + a.query_rows[b] * a.out_stride_token + h * G * a.out_stride_head;
      for (int64_t g = 0; g < G; ++g) {
        const float inv = 1.0f / l[g];  // l >= 1: the query's own position is always visible
        for (int64_t d = 0; d < D; ++d) store(acc[g * D + d] * inv, out + g * a.out_stride_head + d);
      }
    }
  }
}

template <typename T>
int dispatch_head_dim(const DecodeArgs& a) {
  switch (a.head_dim) {
    case 64: decode<T, 64>(a); break;
    case 128: decode<T, 128>(a); break;
    default: decode<T, 0>(a); break;
  }
  return 0;
}

}  // namespace

extern "C" {

// dtype: 0 fp32, 1 fp16, 2 bf16. Returns 0, or -1 for an unknown dtype.
int pagedlm_decode_attention(int dtype, const void* q, const void* k_cache, const void* v_cache, void* out,
                             const int64_t* query_rows, const int64_t* seq_lens, const int64_t* block_tables,
                             int64_t block_table_stride, int64_t q_stride_token, int64_t q_stride_head,
                             int64_t out_stride_token, int64_t out_stride_head, int64_t num_seqs,
                             int64_t num_kv_heads, int64_t group, int64_t head_dim, int64_t block_size, float scale,
                             int64_t sliding_window, int num_threads) {
  const DecodeArgs args{q, k_cache, v_cache, out, query_rows, seq_lens, block_tables, block_table_stride,
                        q_stride_token, q_stride_head, out_stride_token, out_stride_head, num_seqs, num_kv_heads,
                        group, head_dim, block_size, scale, sliding_window, num_threads};
  switch (dtype) {
    case 0: return dispatch_head_dim<float>(args);
    case 1: return dispatch_head_dim<_Float16>(args);
    case 2: return dispatch_head_dim<bf16_t>(args);
    default: return -1;
  }
}
}
