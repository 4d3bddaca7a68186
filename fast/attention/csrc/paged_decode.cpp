// Paged decode attention on CPU: one query token per row, K/V read in place through the block
// table (no gather into a workspace). Plain C ABI, called through ctypes by
// fast/attention/cpu_backend.py, which checks every argument first; no torch headers, so the
// build takes seconds.
//
// Cache layout: k_cache, v_cache [num_blocks, block_size, num_kv_heads, head_dim], contiguous;
// the token at position p of sequence b, kv head h, is the row
//     ((block_tables[b, p / block_size] * block_size + p % block_size) * num_kv_heads + h) * head_dim
//
// Work items spread over OpenMP threads (torch's own libgomp: same soname, already loaded): a
// sequence with all its kv heads when there are >= 4 sequences per thread (each cache block is
// then read as one contiguous stretch), else (sequence, kv head). An item holds its query heads
// (pre-scaled, fp32) and walks the sequence's visible positions in TILES of up to 16 consecutive
// positions (a tile may cross cache blocks: each row's address comes from the block table), with
// an online softmax in fp32, one update per tile.
//
// The vector path (x86 with AVX2 + FMA + F16C; 512-bit rows where AVX-512F is there and head_dim
// is a multiple of 16, else 256-bit rows for head_dim a multiple of 8):
//   scores  for each row t of the tile, each loaded K chunk serves every query head of the pass
//           (up to 4 query heads of one kv head at once; the row comes from memory once, then
//           from L1 for the next pass); per (head, row) a vector of partial sums is kept, and
//           the tile's 16 partial vectors of a head are reduced together by a transpose-and-add
//           (hadd tree) into 16 scores: one horizontal reduction per tile and head, not one per
//           token.
//   softmax the tile's 16 scores of a head in two 8-lane vectors: max, exp (vectorized Cephes
//           polynomial), sum; the accumulator is rescaled only when the running max moves.
//   p . V   each loaded V chunk is broadcast-FMA'd into the accumulators of every head of the pass.
//   The rows of the tile two ahead are prefetched into L2 while this one is processed, one row
//   per row (K in the scores loop, V in the p . V loop).
// Other head dims, and builds without AVX2 (e.g. ARM), take the portable path
// (`decode_portable`): block by block, one dot product per (head, token), loops written for
// gcc's auto-vectorizer.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

// Tests build the other paths on an AVX-512 machine with -DPAGEDLM_NO_AVX512 (256-bit rows for
// every head_dim a multiple of 8) and -DPAGEDLM_PORTABLE_ONLY (no vector path).
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__) && !defined(PAGEDLM_PORTABLE_ONLY)
#include <immintrin.h>
#define PAGEDLM_VECTOR_PATH 1
#if defined(__AVX512F__) && !defined(PAGEDLM_NO_AVX512)
#define PAGEDLM_AVX512 1
#else
#define PAGEDLM_AVX512 0
#endif
#else
#define PAGEDLM_VECTOR_PATH 0
#define PAGEDLM_AVX512 0
#endif

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
  int64_t heads_per_item;  // kv heads per work item: num_kv_heads or 1 (the vector path; the portable one takes 1)
};

// The visible positions [start, end) of sequence b's query (its last position is end - 1).
inline void visible_range(const DecodeArgs& a, int64_t b, int64_t* start, int64_t* end) {
  const int64_t seq_len = a.seq_lens[b];
  *start = a.sliding_window > 0 ? std::max<int64_t>(0, seq_len - a.sliding_window) : 0;
#ifdef PAGEDLM_PLANTED_OFF_BY_ONE  // tests only: a build that misses each sequence's newest position
  *end = seq_len - 1;
#else
  *end = seq_len;
#endif
}

// ------------------------------------------------------------------------------ portable path

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

// Block by block (the tile is the part of a cache block in the window); one dot product per
// (head, token) with a horizontal reduction: the fallback where the vector path does not apply.
template <typename T>
void decode_portable(const DecodeArgs& a) {
  const int64_t G = a.group, BS = a.block_size, H = a.num_kv_heads, D = a.head_dim;
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
      int64_t start, end;
      visible_range(a, b, &start, &end);
      const T* q_in = static_cast<const T*>(a.q) + a.query_rows[b] * a.q_stride_token + h * G * a.q_stride_head;
      for (int64_t g = 0; g < G; ++g) {
        for (int64_t d = 0; d < D; ++d) q[g * D + d] = to_float(q_in[g * a.q_stride_head + d]) * a.scale;
        m[g] = -INFINITY;
        l[g] = 0.0f;
      }
      std::fill(acc.begin(), acc.end(), 0.0f);
      const int64_t* table = a.block_tables + b * a.block_table_stride;
      for (int64_t blk = start / BS; blk * BS < end; ++blk) {
        const int64_t first = std::max(start, blk * BS) - blk * BS;  // offsets [first, last) in the block
        const int64_t last = std::min(end, (blk + 1) * BS) - blk * BS;
        const int64_t n = last - first;
        const int64_t base = ((table[blk] * BS + first) * H + h) * D;
        for (int64_t t = 0; t < n; ++t) {
          k_ptrs[t] = row_as_float(k_cache + base + t * token_stride, k_buf.data() + t * D, D);
          v_ptrs[t] = row_as_float(v_cache + base + t * token_stride, v_buf.data() + t * D, D);
        }
        for (int64_t g = 0; g < G; ++g) {
          const float* __restrict__ qg = q.data() + g * D;
          float* sg = scores.data() + g * BS;
          for (int64_t t = 0; t < n; ++t) {
            const float* __restrict__ k = k_ptrs[t];
            float s = 0.0f;
#pragma omp simd reduction(+ : s)
            for (int64_t d = 0; d < D; ++d) s += qg[d] * k[d];
            sg[t] = s;
          }
          float block_max = m[g];
          for (int64_t t = 0; t < n; ++t) block_max = std::max(block_max, sg[t]);
          float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
          for (int64_t t = 0; t < n; ++t) {
            const float p = exp_nonpositive(sg[t] - block_max);
            sg[t] = p;
            sum += p;
          }
          float* __restrict__ ag = acc.data() + g * D;
          if (block_max != m[g]) {
            const float alpha = m[g] == -INFINITY ? 0.0f : std::exp(m[g] - block_max);
            for (int64_t d = 0; d < D; ++d) ag[d] *= alpha;
            l[g] *= alpha;
            m[g] = block_max;
          }
          l[g] += sum;
          for (int64_t t = 0; t < n; ++t) {
            const float p = sg[t];
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

// ------------------------------------------------------------------------------ vector path
#if PAGEDLM_VECTOR_PATH

constexpr int TILE = 16;  // positions per tile: one 16-lane vector of scores (two 8-lane halves)
constexpr int AHEAD = 2;  // prefetch distance in tiles (1 measured slower, 3 and 5 no faster)

// 8 fp32 from 8 elements of T.
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const _Float16* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
inline __m256 load8(const bf16_t* p) {
  const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}

// 256-bit rows: 8 lanes per chunk.
struct Vec256 {
  using reg = __m256;
  static constexpr int W = 8;
  static reg zero() { return _mm256_setzero_ps(); }
  static reg set1(float x) { return _mm256_set1_ps(x); }
  static reg loadf(const float* p) { return _mm256_loadu_ps(p); }
  template <typename T>
  static reg load(const T* p) { return load8(p); }
  static void storef(float* p, reg x) { _mm256_storeu_ps(p, x); }
  static reg mul(reg a, reg b) { return _mm256_mul_ps(a, b); }
  static reg fma(reg a, reg b, reg c) { return _mm256_fmadd_ps(a, b, c); }
  static __m256 fold(reg x) { return x; }  // partial sums as 8 lanes
};

#if PAGEDLM_AVX512
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const _Float16* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
inline __m512 load16(const bf16_t* p) {
  const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}

// 512-bit rows: 16 lanes per chunk.
struct Vec512 {
  using reg = __m512;
  static constexpr int W = 16;
  static reg zero() { return _mm512_setzero_ps(); }
  static reg set1(float x) { return _mm512_set1_ps(x); }
  static reg loadf(const float* p) { return _mm512_loadu_ps(p); }
  template <typename T>
  static reg load(const T* p) { return load16(p); }
  static void storef(float* p, reg x) { _mm512_storeu_ps(p, x); }
  static reg mul(reg a, reg b) { return _mm512_mul_ps(a, b); }
  static reg fma(reg a, reg b, reg c) { return _mm512_fmadd_ps(a, b, c); }
  static __m256 fold(reg x) {  // partial sums as 8 lanes: low half + high half
    return _mm256_add_ps(_mm512_castps512_ps256(x),
                         _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(x), 1)));
  }
};
#endif

// r[i] = the sum of the 8 lanes of x[i], for i < 8: two levels of hadd, one 128-bit swap.
inline __m256 reduce8x8(const __m256* x) {
  const __m256 t0 = _mm256_hadd_ps(x[0], x[1]), t1 = _mm256_hadd_ps(x[2], x[3]);
  const __m256 t2 = _mm256_hadd_ps(x[4], x[5]), t3 = _mm256_hadd_ps(x[6], x[7]);
  const __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

inline float hmax8(__m256 x) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_movehdup_ps(m));
  return _mm_cvtss_f32(m);
}

inline float hsum8(__m256 x) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// exp_nonpositive on 8 lanes (same polynomial, same rounding steps).
inline __m256 exp8_nonpositive(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
  const __m256 fx = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fmadd_ps(fx, _mm256_set1_ps(2.12194440e-4f), x);
  const __m256 z = _mm256_mul_ps(x, x);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_add_ps(_mm256_fmadd_ps(y, z, x), _mm256_set1_ps(1.0f));
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(fx), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(bits));
}

// Per-thread state of one work item: the pre-scaled queries, accumulators, running max and sum.
struct ItemState {
  float* q;    // [G, D]
  float* acc;  // [G, D]
  float* m;    // [G]
  float* l;    // [G]
};

// Prefetch: `ahead` names the same kv head's rows in a later tile (`ahead.n` rows at offsets
// `ahead.rows`, `ahead.elems` elements each); the scores loop prefetches their K, the p . V loop
// their V, one row per row of this tile: spread between the loads, since a burst of prefetches
// would overflow the core's miss queue.
template <typename T>
struct Ahead {
  const T* k;
  const T* v;
  const int64_t* rows;
  int n;
  int64_t elems;
};

// Into L2, not L1 (prefetcht2): prefetcht0 of a tile's 16 KB held the L1 miss buffers the demand
// loads need, and the kernel ran 1.45x slower from DRAM than with prefetcht2 (prefetcht1 about
// the same as t2; single thread, batch 64 x 1024, Zen 4). An asm statement: gcc 12 deletes a
// conditional __builtin_prefetch (it has no side effect to keep), which silently dropped them all.
inline void prefetch(const void* p) { asm volatile("prefetcht2 %0" : : "m"(*static_cast<const char*>(p))); }

template <typename T>
inline void prefetch_row(const T* base, const Ahead<T>& ahead, int t) {
  if (t < ahead.n) {
    constexpr int64_t line = 64 / static_cast<int64_t>(sizeof(T));
    for (int64_t e = 0; e < ahead.elems; e += line) prefetch(base + ahead.rows[t] + e);
  }
}

// One tile of n rows (row offsets in elements, from k_cache / v_cache) for the GC query heads
// [g0, g0 + GC) of one kv head. C: chunks of V::W lanes per row (0: `chunks_rt`, at run time).
template <typename T, class V, int C, int GC>
inline void tile_heads(const T* __restrict__ k_cache, const T* __restrict__ v_cache, const int64_t* rows, int n,
                       const ItemState& s, int64_t g0, int64_t D, int chunks_rt, const Ahead<T>& ahead) {
  using reg = typename V::reg;
  constexpr int W = V::W;
  const int chunks = C > 0 ? C : chunks_rt;
  alignas(32) __m256 parts[GC][TILE];
  alignas(32) float p[GC][TILE];
  // scores: q . k for each row; every K chunk serves the GC heads.
  for (int t = 0; t < n; ++t) {
    prefetch_row(ahead.k, ahead, t);
    const T* k = k_cache + rows[t];
    reg sum[GC];
    {
      const reg kc = V::template load<T>(k);
#pragma GCC unroll 4
      for (int g = 0; g < GC; ++g) sum[g] = V::mul(V::loadf(s.q + (g0 + g) * D), kc);
    }
    for (int c = 1; c < chunks; ++c) {
      const reg kc = V::template load<T>(k + c * W);
#pragma GCC unroll 4
      for (int g = 0; g < GC; ++g) sum[g] = V::fma(V::loadf(s.q + (g0 + g) * D + c * W), kc, sum[g]);
    }
#pragma GCC unroll 4
    for (int g = 0; g < GC; ++g) parts[g][t] = V::fold(sum[g]);
  }
  for (int t = n; t < TILE; ++t)
    for (int g = 0; g < GC; ++g) parts[g][t] = _mm256_setzero_ps();
  // online softmax of the tile: one reduction per (head, 8 rows); lanes >= n are masked out.
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256 live0 = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(n), lane));
  const __m256 live1 = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(n - 8), lane));
  const __m256 neg_inf = _mm256_set1_ps(-INFINITY);
  for (int g = 0; g < GC; ++g) {
    const __m256 s0 = _mm256_blendv_ps(neg_inf, reduce8x8(parts[g]), live0);
    const __m256 s1 = n > 8 ? _mm256_blendv_ps(neg_inf, reduce8x8(parts[g] + 8), live1) : neg_inf;
    const int64_t gi = g0 + g;
    const float tile_max = hmax8(_mm256_max_ps(s0, s1));
    if (tile_max > s.m[gi]) {  // the running max moves: rescale what was accumulated
      const float alpha = s.m[gi] == -INFINITY ? 0.0f : exp_nonpositive(s.m[gi] - tile_max);
      float* ag = s.acc + gi * D;
      const reg va = V::set1(alpha);
      for (int c = 0; c < chunks; ++c) V::storef(ag + c * W, V::mul(V::loadf(ag + c * W), va));
      s.l[gi] *= alpha;
      s.m[gi] = tile_max;
    }
    const __m256 mx = _mm256_set1_ps(s.m[gi]);
    const __m256 p0 = _mm256_and_ps(exp8_nonpositive(_mm256_sub_ps(s0, mx)), live0);
    const __m256 p1 = _mm256_and_ps(exp8_nonpositive(_mm256_sub_ps(s1, mx)), live1);
    _mm256_store_ps(p[g], p0);
    _mm256_store_ps(p[g] + 8, p1);
    s.l[gi] += hsum8(_mm256_add_ps(p0, p1));
  }
  // acc += p . V: every V chunk serves the GC heads.
  if constexpr (C > 0) {
    reg acc[GC][C];
#pragma GCC unroll 4
    for (int g = 0; g < GC; ++g)
#pragma GCC unroll 16
      for (int c = 0; c < C; ++c) acc[g][c] = V::loadf(s.acc + (g0 + g) * D + c * W);
    for (int t = 0; t < n; ++t) {
      prefetch_row(ahead.v, ahead, t);
      const T* v = v_cache + rows[t];
#pragma GCC unroll 16
      for (int c = 0; c < C; ++c) {
        const reg vc = V::template load<T>(v + c * W);
#pragma GCC unroll 4
        for (int g = 0; g < GC; ++g) acc[g][c] = V::fma(V::set1(p[g][t]), vc, acc[g][c]);
      }
    }
#pragma GCC unroll 4
    for (int g = 0; g < GC; ++g)
#pragma GCC unroll 16
      for (int c = 0; c < C; ++c) V::storef(s.acc + (g0 + g) * D + c * W, acc[g][c]);
  } else {
    for (int t = 0; t < n; ++t) prefetch_row(ahead.v, ahead, t);
    for (int c = 0; c < chunks; ++c) {
      reg acc[GC];
      for (int g = 0; g < GC; ++g) acc[g] = V::loadf(s.acc + (g0 + g) * D + c * W);
      for (int t = 0; t < n; ++t) {
        const reg vc = V::template load<T>(v_cache + rows[t] + c * W);
        for (int g = 0; g < GC; ++g) acc[g] = V::fma(V::set1(p[g][t]), vc, acc[g]);
      }
      for (int g = 0; g < GC; ++g) V::storef(s.acc + (g0 + g) * D + c * W, acc[g]);
    }
  }
}

// The heads per pass: as many as keep a pass's accumulators in half the vector registers (32
// with AVX-512, 16 with AVX2), at most 4.
template <class V, int C>
constexpr int heads_per_pass() {
  constexpr int registers = V::W == 16 ? 32 : 16;
  return C == 0 ? 4 : std::max(1, std::min(4, registers / 2 / C));
}

template <typename T, class V, int C>
void decode_vector(const DecodeArgs& a) {
  const int64_t G = a.group, BS = a.block_size, H = a.num_kv_heads, D = a.head_dim;
  const int chunks = static_cast<int>(D / V::W);
  constexpr int GC = heads_per_pass<V, C>();
  const int64_t HI = a.heads_per_item == H ? H : 1;  // kv heads per item
  const int64_t items = a.num_seqs * (H / HI);
  const T* k_cache = static_cast<const T*>(a.k_cache);
  const T* v_cache = static_cast<const T*>(a.v_cache);
#pragma omp parallel num_threads(a.num_threads)
  {
    std::vector<float> buffer(HI * (2 * G * D + 2 * G));
    float* const q = buffer.data();             // [HI * G, D], pre-scaled
    float* const acc = q + HI * G * D;          // [HI * G, D]
    float* const m = acc + HI * G * D;          // [HI * G]: running max
    float* const l = m + HI * G;                // [HI * G]: running sum
    int64_t rows[AHEAD + 1][TILE];  // a ring: this tile's rows and those of the AHEAD next tiles
    int counts[AHEAD + 1];
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < items; ++item) {
      const int64_t b = item / (H / HI), h0 = item % (H / HI) * HI;  // kv heads [h0, h0 + HI)
      int64_t start, end;
      visible_range(a, b, &start, &end);
      const T* q_in = static_cast<const T*>(a.q) + a.query_rows[b] * a.q_stride_token + h0 * G * a.q_stride_head;
      for (int64_t g = 0; g < HI * G; ++g) {
        for (int64_t d = 0; d < D; ++d) q[g * D + d] = to_float(q_in[g * a.q_stride_head + d]) * a.scale;
        m[g] = -INFINITY;
        l[g] = 0.0f;
      }
      std::fill(acc, acc + HI * G * D, 0.0f);
      const int64_t* table = a.block_tables + b * a.block_table_stride;
      // Offsets of the next tile's token rows (kv head h0) into rows[slot], and their count (0
      // past the end); a tile may cross cache blocks. (pos, blk, off) moves along.
      int64_t pos = start, blk = start / BS, off = start % BS;
      auto fill = [&](int slot) {
        const int n = static_cast<int>(std::min<int64_t>(TILE, end - pos));
#ifdef PAGEDLM_PLANTED_TILE_IN_ONE_BLOCK  // tests only: a tile's rows all taken from its first block
        const int64_t first_block = table[blk];
#endif
        for (int t = 0; t < n; ++t) {
#ifdef PAGEDLM_PLANTED_TILE_IN_ONE_BLOCK
          rows[slot][t] = ((first_block * BS + off) * H + h0) * D;
#else
          rows[slot][t] = ((table[blk] * BS + off) * H + h0) * D;
#endif
          if (++off == BS) off = 0, ++blk;
        }
        pos += std::max(n, 0);
        counts[slot] = std::max(n, 0);
      };
      for (int i = 0; i < AHEAD; ++i) fill(i);
      for (int tile = 0; counts[tile % (AHEAD + 1)] > 0; ++tile) {
        const int cur = tile % (AHEAD + 1), later = (tile + AHEAD) % (AHEAD + 1);
        fill(later);  // the tile AHEAD after this one, prefetched while this one is processed
        const int n = counts[cur];
        for (int64_t hi = 0; hi < HI; ++hi) {
          const ItemState s{q + hi * G * D, acc + hi * G * D, m + hi * G, l + hi * G};
          const T* kh = k_cache + hi * D;
          const T* vh = v_cache + hi * D;
          const Ahead<T> ahead{kh, vh, rows[later], counts[later], D};
          const Ahead<T> none{kh, vh, rows[later], 0, 0};
          int64_t g0 = 0;
          for (; g0 + GC <= G; g0 += GC)
            tile_heads<T, V, C, GC>(kh, vh, rows[cur], n, s, g0, D, chunks, g0 == 0 ? ahead : none);
#ifdef PAGEDLM_PLANTED_NO_REMAINDER_PASS  // tests only: the heads past the last full pass are skipped
          continue;
#endif
          switch (G - g0) {  // the remaining heads (GC > 1 only)
            case 3: if constexpr (GC > 3) tile_heads<T, V, C, 3>(kh, vh, rows[cur], n, s, g0, D, chunks, g0 == 0 ? ahead : none); break;
            case 2: if constexpr (GC > 2) tile_heads<T, V, C, 2>(kh, vh, rows[cur], n, s, g0, D, chunks, g0 == 0 ? ahead : none); break;
            case 1: if constexpr (GC > 1) tile_heads<T, V, C, 1>(kh, vh, rows[cur], n, s, g0, D, chunks, g0 == 0 ? ahead : none); break;
            default: break;
          }
        }
      }
      T* out = static_cast<T*>(a.out) + a.query_rows[b] * a.out_stride_token + h0 * G * a.out_stride_head;
      for (int64_t g = 0; g < HI * G; ++g) {
        const float inv = 1.0f / l[g];  // l >= 1: the query's own position is always visible
        for (int64_t d = 0; d < D; ++d) store(acc[g * D + d] * inv, out + g * a.out_stride_head + d);
      }
    }
  }
}

#endif  // PAGEDLM_VECTOR_PATH

// Which path a head_dim takes in this build: 512, 256 (bits per vector) or 0 (portable).
int row_path(int64_t head_dim) {
#if PAGEDLM_VECTOR_PATH
#if PAGEDLM_AVX512
  if (head_dim % 16 == 0) return 512;
#endif
  if (head_dim % 8 == 0) return 256;
#endif
  (void)head_dim;
  return 0;
}

int heads_per_pass_for(int64_t head_dim) {
#if PAGEDLM_VECTOR_PATH
  switch (row_path(head_dim)) {
#if PAGEDLM_AVX512
    case 512:
      return head_dim == 64 ? heads_per_pass<Vec512, 4>() : head_dim == 128 ? heads_per_pass<Vec512, 8>()
                                                                             : heads_per_pass<Vec512, 0>();
#endif
    case 256:
      return head_dim == 64 ? heads_per_pass<Vec256, 8>() : head_dim == 128 ? heads_per_pass<Vec256, 16>()
                                                                             : heads_per_pass<Vec256, 0>();
    default:
      break;
  }
#endif
  (void)head_dim;
  return 1;
}

template <typename T>
int dispatch(const DecodeArgs& a) {
#if PAGEDLM_VECTOR_PATH
  switch (row_path(a.head_dim)) {
#if PAGEDLM_AVX512
    case 512:
      if (a.head_dim == 64) decode_vector<T, Vec512, 4>(a);
      else if (a.head_dim == 128) decode_vector<T, Vec512, 8>(a);
      else decode_vector<T, Vec512, 0>(a);
      return 0;
#endif
    case 256:
      if (a.head_dim == 64) decode_vector<T, Vec256, 8>(a);
      else if (a.head_dim == 128) decode_vector<T, Vec256, 16>(a);
      else decode_vector<T, Vec256, 0>(a);
      return 0;
    default:
      break;
  }
#endif
  decode_portable<T>(a);
  return 0;
}

}  // namespace

extern "C" {

// dtype: 0 fp32, 1 fp16, 2 bf16. Returns 0, or -1 for an unknown dtype.
// heads_per_item: num_kv_heads (a work item is a sequence) or 1 (a sequence and kv head); the
// launcher picks (cpu_backend.heads_per_item).
int pagedlm_decode_attention(int dtype, const void* q, const void* k_cache, const void* v_cache, void* out,
                             const int64_t* query_rows, const int64_t* seq_lens, const int64_t* block_tables,
                             int64_t block_table_stride, int64_t q_stride_token, int64_t q_stride_head,
                             int64_t out_stride_token, int64_t out_stride_head, int64_t num_seqs,
                             int64_t num_kv_heads, int64_t group, int64_t head_dim, int64_t block_size, float scale,
                             int64_t sliding_window, int num_threads, int64_t heads_per_item) {
  const DecodeArgs args{q, k_cache, v_cache, out, query_rows, seq_lens, block_tables, block_table_stride,
                        q_stride_token, q_stride_head, out_stride_token, out_stride_head, num_seqs, num_kv_heads,
                        group, head_dim, block_size, scale, sliding_window, num_threads, heads_per_item};
  switch (dtype) {
    case 0: return dispatch<float>(args);
    case 1: return dispatch<_Float16>(args);
    case 2: return dispatch<bf16_t>(args);
    default: return -1;
  }
}

// The row path a head_dim takes in this build: 512 or 256 (vector bits), 0 (portable loops).
int pagedlm_row_path(int64_t head_dim) { return row_path(head_dim); }

// The query heads of one kv head that each loaded row serves (vector path; 1 on the portable one).
int pagedlm_heads_per_pass(int64_t head_dim) { return heads_per_pass_for(head_dim); }
}
