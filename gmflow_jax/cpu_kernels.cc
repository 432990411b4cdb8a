// Native CPU kernels for the per-pixel GM reductions over the K axis (XLA FFI custom calls).
//
// Why they exist: XLA:CPU (jax 0.10) compiles every sum over the K axis of a `[..., K, C]` array
// with C = 4 minor into scalar loops (one `vfmadd231ss` per term, no vector register), so the GM
// operations that need two or three such passes run at ~15-25% of the machine's copy bandwidth
// (`benchmarks/gm_ops.py`). These kernels do each operation in one pass over the GM, in vector
// registers, for the latent GM of the paper's models: K = 8 components, C = 4 channels (callers
// keep the XLA forms for every other shape). The math is exactly that of the XLA forms in `gm.py`
// (same clamps, same treatment of non-finite values, the same centred two-pass variance); results
// differ from them by float32 rounding only (docs/math.md §2.1, §2.2, §2.4, §2.5, §3.4;
// tests/unit/test_cpu_kernels.py).
//
// Layout: dense row-major buffers, flattened to P pixels: means [P, 8, 4], logweights [P, 8]
// (normalized), point [P, 4]; per-sample scalars (denominators, affine coefficients, the GM's
// variance) as S values for S equal blocks of pixels. One pixel's means are two 16-float vectors
// (components 0-3 and 4-7, four channels each) and its weights one 8-float vector; sums over
// components are butterfly shuffles within a vector. Weights are exponentiated 16 at a time over a tile's
// contiguous [16, 8] block (exp and log are polynomials below: the C library's scalar `expf` would
// be the bottleneck). GCC/Clang vector extensions, compiled with `-march=native`: one 512-bit
// register per vector with AVX-512, two or four narrower ones otherwise.
//
// Threads: tiles are split into chunks shared between the calling thread and XLA's intra-op
// thread pool (the FFI `ThreadPool` context); each participant claims chunks from an atomic
// counter, so the caller never waits for a task that has not started (no deadlock when the pool
// is busy) and a task that starts late finds no work and returns.

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <utility>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

typedef float V16 __attribute__((vector_size(64)));
typedef float V8 __attribute__((vector_size(32)));
typedef float V4 __attribute__((vector_size(16)));
typedef int32_t I16 __attribute__((vector_size(64)));

constexpr int64_t K = 8;                 // components
constexpr int64_t C = 4;                 // channels
constexpr int64_t kTile = 16;            // pixels per tile: one 16-float vector of per-pixel values
constexpr int64_t kTilesPerChunk = 64;   // 1024 pixels (128 KB of means) per claimed chunk
constexpr float kInf = __builtin_inff();

V16 Splat(float x) { return V16{} + x; }

template <class V>
V Load(const float* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}

template <class V>
void Store(float* p, V v) {
  std::memcpy(p, &v, sizeof(V));
}

// exp(x): 2^n exp(r), n = round(x / ln 2) (by the 1.5 * 2^23 trick), r = x - n ln 2 in two parts
// (Cody-Waite), |r| <= ln(2) / 2, exp(r) by a degree-7 polynomial (relative error ~1e-7). Below
// -87.3 (under the smallest normal result) it gives 0, above 88.7 +inf; NaN stays NaN (r, and so
// the result, are NaN). kNonPositive: the caller guarantees x <= 0 or NaN (the max-shifted
// exponentials of a log-sum-exp), and the upper clamp is skipped.
template <bool kNonPositive = false>
V16 Exp(V16 x) {
  const V16 lo = Splat(-87.33654475f), hi = Splat(88.72283905f);
  V16 xc = x < lo ? lo : x;
  if (!kNonPositive) xc = xc > hi ? hi : xc;
  const V16 shifter = Splat(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
  V16 n = (xc * 1.44269504088896341f + shifter) - shifter;
  V16 r = xc - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  V16 p = Splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  V16 y = p * (r * r) + r + 1.0f;
  I16 bits = (__builtin_convertvector(n, I16) + 127) << 23;  // 2^n for n in [-126, 128)
  y = y * (V16)bits;  // a vector cast between same-size vectors reinterprets the bits
  y = x < lo ? V16{} : y;
  if (!kNonPositive) y = x > hi ? Splat(kInf) : y;
  return y;
}

// log(s) for s >= 1 or NaN (the clamped sums of exponentials of a log-sum-exp): s = 2^e m with
// m in [sqrt(1/2), sqrt(2)), log(m) = f - f^2/2 + f^3 q(f), f = m - 1 (relative error ~1e-7).
V16 Log(V16 s) {
  I16 bits = (I16)s;
  I16 e = ((bits >> 23) & 0xff) - 127;
  I16 mbits = (bits & 0x007fffff) | 0x3f800000;  // the mantissa with exponent 0: m in [1, 2)
  V16 m = (V16)mbits;
  auto big = m > 1.41421356f;
  m = big ? m * 0.5f : m;
  V16 ef = __builtin_convertvector(e, V16);
  ef = big ? ef + 1.0f : ef;
  V16 f = m - 1.0f;
  V16 q = Splat(7.0376836292e-2f);
  q = q * f - 1.1514610310e-1f;
  q = q * f + 1.1676998740e-1f;
  q = q * f - 1.2420140846e-1f;
  q = q * f + 1.4249322787e-1f;
  q = q * f - 1.6668057665e-1f;
  q = q * f + 2.0000714765e-1f;
  q = q * f - 2.4999993993e-1f;
  q = q * f + 3.3333331174e-1f;
  V16 f2 = f * f;
  V16 y = (f * f2 * q - 0.5f * f2 + f) + ef * 0.693147180559945309f;
  return s != s ? s : y;  // NaN stays NaN
}

// Butterfly reductions: every lane of the result holds the reduction over its group.
V16 SumOver4Groups(V16 v) {  // lanes 4i..4i+3 of four 4-lane groups: the sum over the four groups
  v = v + __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7);
  return v + __builtin_shufflevector(v, v, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11);
}
V16 SumWithin4(V16 v) {  // each 4-lane group: the sum of its four lanes
  v = v + __builtin_shufflevector(v, v, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14);
  return v + __builtin_shufflevector(v, v, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13);
}
V8 Sum8(V8 v) {
  v = v + __builtin_shufflevector(v, v, 4, 5, 6, 7, 0, 1, 2, 3);
  v = v + __builtin_shufflevector(v, v, 2, 3, 0, 1, 6, 7, 4, 5);
  return v + __builtin_shufflevector(v, v, 1, 0, 3, 2, 5, 4, 7, 6);
}
V8 Max(V8 a, V8 b) { return b > a ? b : a; }
V8 Max8(V8 v) {
  v = Max(v, __builtin_shufflevector(v, v, 4, 5, 6, 7, 0, 1, 2, 3));
  v = Max(v, __builtin_shufflevector(v, v, 2, 3, 0, 1, 6, 7, 4, 5));
  return Max(v, __builtin_shufflevector(v, v, 1, 0, 3, 2, 5, 4, 7, 6));
}

// The point of pixel J (0-3) of a 16-float block of four pixels' points, over its four components.
template <int J>
V16 PointOf(V16 block) {
  return __builtin_shufflevector(block, block, 4 * J, 4 * J + 1, 4 * J + 2, 4 * J + 3, 4 * J,
                                 4 * J + 1, 4 * J + 2, 4 * J + 3, 4 * J, 4 * J + 1, 4 * J + 2,
                                 4 * J + 3, 4 * J, 4 * J + 1, 4 * J + 2, 4 * J + 3);
}

// The weights of components 0-3 and 4-7, each repeated over the four channels of its component.
V16 WeightsLo(V8 w) { return __builtin_shufflevector(w, w, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3); }
V16 WeightsHi(V8 w) { return __builtin_shufflevector(w, w, 4, 4, 4, 4, 5, 5, 5, 5, 6, 6, 6, 6, 7, 7, 7, 7); }

// sum_k w_k mu_k, replicated in all four 4-lane groups.
V16 WeightedMean(V16 lo, V16 hi, V16 wlo, V16 whi) { return SumOver4Groups(wlo * lo + whi * hi); }

// Per-sample scalars (d, a, b, the GM variance) are arrays of S values over P pixels, S dividing P:
// pixel p reads value p / (P / S) (the scalars' shape is a leading part of the pixels' shape).
struct Scalars {
  const float* data = nullptr;
  int64_t stride = 1;  // pixels per value

  // values of pixels [p0, p0 + n) into out[0, n)
  void Gather(int64_t p0, int64_t n, float* out) const {
    int64_t s = p0 / stride, next = (s + 1) * stride;
    if (p0 + n <= next) {  // the whole tile in one block (the usual case)
      std::fill(out, out + n, data[s]);
      return;
    }
    for (int64_t t = 0; t < n; ++t) {
      while (p0 + t >= next) {
        ++s;
        next += stride;
      }
      out[t] = data[s];
    }
  }
};

struct Problem {
  int64_t pixels;
  const float *means, *logw;                        // [P, K, C], [P, K]
  const float* point = nullptr;                     // [P, C]
  Scalars denom, a, b, var0;                        // per sample
  float *mean_out = nullptr, *spread_out = nullptr;  // [P, C], [P]
  float *logw_out = nullptr, *means_out = nullptr;   // [P, K], [P, K, C]
  float* lse_out = nullptr;                          // [P]
};

// The tile being processed: pixels [p0, p0 + n), n <= kTile. The inputs of a partial last tile
// are read through padded copies (zeros), so every load below is in bounds; the per-sample
// scalars are gathered per pixel (past the end: denominators 1, the others 0).
struct Tile {
  const float *means, *logw, *point;
  int64_t n;
  alignas(64) float denom[kTile], a[kTile], b[kTile], var0[kTile];
  alignas(64) float pad_means[kTile * K * C];
  alignas(64) float pad_logw[kTile * K];
  alignas(64) float pad_point[kTile * C];

  void Set(const Problem& pb, int64_t p0) {
    n = std::min(kTile, pb.pixels - p0);
    means = pb.means + p0 * K * C;
    logw = pb.logw + p0 * K;
    point = pb.point != nullptr ? pb.point + p0 * C : nullptr;
    if (n < kTile) {
      means = Pad(means, n * K * C, pad_means, kTile * K * C);
      logw = Pad(logw, n * K, pad_logw, kTile * K);
      point = Pad(point, n * C, pad_point, kTile * C);
      std::fill(denom, denom + kTile, 1.0f);
      for (float* x : {a, b, var0}) std::fill(x, x + kTile, 0.0f);
    }
    const Scalars* from[] = {&pb.denom, &pb.a, &pb.b, &pb.var0};
    float* to[] = {denom, a, b, var0};
    for (int i = 0; i < 4; ++i)
      if (from[i]->data != nullptr) from[i]->Gather(p0, n, to[i]);
  }

  static const float* Pad(const float* src, int64_t count, float* dst, int64_t size) {
    if (src == nullptr) return nullptr;
    std::copy(src, src + count, dst);
    std::fill(dst + count, dst + size, 0.0f);
    return dst;
  }
};

// gm_mean (no spread_out) and gm_to_iso_gaussian: w_k = exp(l_k), m = sum_k w_k mu_k, and the
// variance sum_k w_k |mu_k - m|^2 / C + var0 (the centred second pass of §2.2).
void MomentsTiles(const Problem& pb, int64_t begin, int64_t end) {
  Tile tile;
  for (int64_t index = begin; index < end; ++index) {
    int64_t p0 = index * kTile;
    tile.Set(pb, p0);
    alignas(64) float w[kTile * K];
    for (int64_t i = 0; i < kTile * K; i += 16) Store(w + i, Exp(Load<V16>(tile.logw + i)));
    alignas(64) float spread[kTile];
    for (int64_t t = 0; t < tile.n; ++t) {
      V16 lo = Load<V16>(tile.means + t * K * C), hi = Load<V16>(tile.means + t * K * C + 16);
      V8 w8 = Load<V8>(w + t * K);
      V16 wlo = WeightsLo(w8), whi = WeightsHi(w8);
      V16 m = WeightedMean(lo, hi, wlo, whi);
      Store(pb.mean_out + (p0 + t) * C, __builtin_shufflevector(m, m, 0, 1, 2, 3));
      if (pb.spread_out != nullptr) {
        V16 dlo = lo - m, dhi = hi - m;
        V16 s = SumWithin4(SumOver4Groups(wlo * (dlo * dlo) + whi * (dhi * dhi)));
        spread[t] = s[0] * (1.0f / C) + tile.var0[t];
      }
    }
    if (pb.spread_out != nullptr) std::copy(spread, spread + tile.n, pb.spread_out + p0);
  }
}

// The tilted GM l_k - |y - mu_k|^2 / d, whose component means are a mu_k + b y. With logw_out:
// the GM itself (§2.5: its normalized log-weights, and its means in means_out); with lse_out:
// its log-normalizer log sum_k exp(l_k - |y - mu_k|^2 / d) + b (§2.4 with d = 2 s^2); else its
// mean (mean_out, §3.4's re-targeted mean): a sum_k w_k mu_k + b y under the tilted weights w.
void TiltedTiles(const Problem& pb, int64_t begin, int64_t end) {
  Tile tile;
  const bool product = pb.logw_out != nullptr;
  for (int64_t index = begin; index < end; ++index) {
    int64_t p0 = index * kTile;
    tile.Set(pb, p0);
    // logits and their max per pixel, the max replicated over the pixel's eight lanes. The max
    // need not propagate NaN as jnp.maximum does: a NaN logit makes the sum of exponentials NaN
    // below, and with it every output of the pixel, as in the XLA forms.
    alignas(64) float logits[kTile * K], shift[kTile * K], mx[kTile];
    V16 inv_d = 1.0f / Load<V16>(tile.denom);  // one division per 16 pixels
    auto pixel = [&](int64_t t, V16 y) {
      const float* mu = tile.means + t * K * C;
      V16 lo = Load<V16>(mu), hi = Load<V16>(mu + 16);
      V16 dlo = y - lo, dhi = y - hi;
      V16 sqlo = SumWithin4(dlo * dlo), sqhi = SumWithin4(dhi * dhi);  // |y - mu_k|^2
      V8 sq = __builtin_shufflevector(sqlo, sqhi, 0, 4, 8, 12, 16, 20, 24, 28);
      V8 l = Load<V8>(tile.logw + t * K) - sq * inv_d[t];
      V8 m = Max8(l);
      Store(logits + t * K, l);
      // shift = the max where finite, else 0 (`gm._unrolled_lse_value`, `gm.axis_softmax`)
      Store(shift + t * K, (m - m) == 0.0f ? m : V8{});
      mx[t] = m[0];
      if (product && t < tile.n) {
        float* out = pb.means_out + (p0 + t) * K * C;
        Store(out, tile.a[t] * lo + tile.b[t] * y);
        Store(out + 16, tile.a[t] * hi + tile.b[t] * y);
      }
    };
    for (int64_t t = 0; t < kTile; t += 4) {  // four pixels' points per 16-float load
      V16 points = Load<V16>(tile.point + t * C);
      pixel(t, PointOf<0>(points));
      pixel(t + 1, PointOf<1>(points));
      pixel(t + 2, PointOf<2>(points));
      pixel(t + 3, PointOf<3>(points));
    }
    // e_k = exp(min(l_k - shift, 0)) over the contiguous tile (the min keeps NaN, as jnp.minimum)
    alignas(64) float e[kTile * K], sum[kTile];
    for (int64_t i = 0; i < kTile * K; i += 16) {
      V16 z = Load<V16>(logits + i) - Load<V16>(shift + i);
      Store(e + i, Exp<true>(z > 0.0f ? V16{} : z));
    }
    for (int64_t t = 0; t < kTile; ++t) sum[t] = Sum8(Load<V8>(e + t * K))[0];
    V16 s = Load<V16>(sum);
    s = s < 1.0f ? Splat(1.0f) : s;  // max(S, 1), NaN kept
    if (product || pb.lse_out != nullptr) {
      // lse = max + log(S) where the max is finite, the max itself (+-inf, NaN) elsewhere
      // (`gm._unrolled_lse_value`); the log-softmax is l_k - lse
      V16 m = Load<V16>(mx);
      V16 lse = (m - m) == 0.0f ? m + Log(s) : m;
      if (product) {
        for (int64_t t = 0; t < tile.n; ++t)
          Store(pb.logw_out + (p0 + t) * K, Load<V8>(logits + t * K) - lse[t]);
      } else {
        alignas(64) float out[kTile];
        Store(out, lse + Load<V16>(tile.b));
        std::copy(out, out + tile.n, pb.lse_out + p0);
      }
    } else {
      // the softmax weights e_k / S (`gm.axis_softmax`): the weighted mean of e_k, over S, mapped
      V16 inv_s = 1.0f / s;
      for (int64_t t = 0; t < tile.n; ++t) {
        V8 e8 = Load<V8>(e + t * K);
        const float* mu = tile.means + t * K * C;
        V16 m = WeightedMean(Load<V16>(mu), Load<V16>(mu + 16), WeightsLo(e8), WeightsHi(e8));
        V4 m4 = __builtin_shufflevector(m, m, 0, 1, 2, 3) * inv_s[t];
        Store(pb.mean_out + (p0 + t) * C, tile.a[t] * m4 + tile.b[t] * Load<V4>(tile.point + t * C));
      }
    }
  }
}

// Run body(tile_begin, tile_end) over all tiles in chunks, on the caller and the FFI thread pool.
void ParallelTiles(ffi::ThreadPool& pool, int64_t num_tiles,
                   const std::function<void(int64_t, int64_t)>& body) {
  struct Job {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
    int64_t num_chunks = 0;
    std::mutex mu;
    std::condition_variable cv;
  };
  auto job = std::make_shared<Job>();
  job->num_chunks = (num_tiles + kTilesPerChunk - 1) / kTilesPerChunk;
  // `body` lives on the caller's stack; a task only calls it for a chunk it claimed, and the caller
  // returns only after every claimed chunk is done.
  const std::function<void(int64_t, int64_t)>* fn = &body;
  auto work = [job, fn, num_tiles]() {
    int64_t finished = 0;
    for (int64_t i; (i = job->next.fetch_add(1)) < job->num_chunks; ++finished) {
      (*fn)(i * kTilesPerChunk, std::min(num_tiles, (i + 1) * kTilesPerChunk));
    }
    if (finished > 0 && job->done.fetch_add(finished) + finished == job->num_chunks) {
      std::lock_guard<std::mutex> lock(job->mu);
      job->cv.notify_all();
    }
  };
  int64_t helpers = std::min<int64_t>(pool.num_threads() - 1, job->num_chunks - 1);
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([work] { work(); });
  work();
  std::unique_lock<std::mutex> lock(job->mu);
  job->cv.wait(lock, [&] { return job->done.load() == job->num_chunks; });
}

using Body = void (*)(const Problem&, int64_t, int64_t);

ffi::Error Run(ffi::ThreadPool& pool, const Problem& pb, Body tiles) {
  ParallelTiles(pool, (pb.pixels + kTile - 1) / kTile,
                [&pb, tiles](int64_t b, int64_t e) { tiles(pb, b, e); });
  return ffi::Error::Success();
}

// Shapes: means [..., 8, 4], logweights [..., 8(, 1)] over the same pixels, point [..., 4]; the
// caller guarantees them; checked again here.
ffi::Error GmProblem(const ffi::Buffer<ffi::F32>& means, const ffi::Buffer<ffi::F32>& logw,
                     Problem* pb) {
  auto dims = means.dimensions();
  if (dims.size() < 2 || dims[dims.size() - 2] != K || dims[dims.size() - 1] != C)
    return ffi::Error::InvalidArgument("means must be [..., 8, 4]");
  pb->pixels = static_cast<int64_t>(means.element_count()) / (K * C);
  if (static_cast<int64_t>(logw.element_count()) != pb->pixels * K)
    return ffi::Error::InvalidArgument("logweights must be [..., 8] over the pixels of means");
  pb->means = means.typed_data();
  pb->logw = logw.typed_data();
  return ffi::Error::Success();
}

// Per-sample scalars: S values with S dividing the pixel count.
ffi::Error SetScalars(const ffi::Buffer<ffi::F32>& x, int64_t pixels, Scalars* out) {
  int64_t count = static_cast<int64_t>(x.element_count());
  if (count < 1 || pixels % count != 0)
    return ffi::Error::InvalidArgument("per-sample scalars must divide the pixels into blocks");
  out->data = x.typed_data();
  out->stride = pixels / count;
  return ffi::Error::Success();
}

ffi::Error TiltProblem(const ffi::Buffer<ffi::F32>& means, const ffi::Buffer<ffi::F32>& logw,
                       const ffi::Buffer<ffi::F32>& point, const ffi::Buffer<ffi::F32>& denom,
                       const ffi::Buffer<ffi::F32>& a, const ffi::Buffer<ffi::F32>& b,
                       Problem* pb) {
  if (ffi::Error err = GmProblem(means, logw, pb); err.failure()) return err;
  if (static_cast<int64_t>(point.element_count()) != pb->pixels * C)
    return ffi::Error::InvalidArgument("point must be [..., 4] over the pixels of means");
  pb->point = point.typed_data();
  for (auto [buffer, scalars] : {std::pair{&denom, &pb->denom}, {&a, &pb->a}, {&b, &pb->b}})
    if (ffi::Error err = SetScalars(*buffer, pb->pixels, scalars); err.failure()) return err;
  return ffi::Error::Success();
}

ffi::Error GmMeanImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> means,
                      ffi::Buffer<ffi::F32> logw, ffi::ResultBuffer<ffi::F32> mean_out) {
  Problem pb;
  if (ffi::Error err = GmProblem(means, logw, &pb); err.failure()) return err;
  pb.mean_out = mean_out->typed_data();
  return Run(pool, pb, MomentsTiles);
}

ffi::Error GmMomentsImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> means,
                         ffi::Buffer<ffi::F32> logw, ffi::Buffer<ffi::F32> var0,
                         ffi::ResultBuffer<ffi::F32> mean_out,
                         ffi::ResultBuffer<ffi::F32> var_out) {
  Problem pb;
  if (ffi::Error err = GmProblem(means, logw, &pb); err.failure()) return err;
  if (ffi::Error err = SetScalars(var0, pb.pixels, &pb.var0); err.failure()) return err;
  pb.mean_out = mean_out->typed_data();
  pb.spread_out = var_out->typed_data();
  return Run(pool, pb, MomentsTiles);
}

ffi::Error GmProductImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> means,
                         ffi::Buffer<ffi::F32> logw, ffi::Buffer<ffi::F32> point,
                         ffi::Buffer<ffi::F32> denom, ffi::Buffer<ffi::F32> a,
                         ffi::Buffer<ffi::F32> b, ffi::ResultBuffer<ffi::F32> means_out,
                         ffi::ResultBuffer<ffi::F32> logw_out) {
  Problem pb;
  if (ffi::Error err = TiltProblem(means, logw, point, denom, a, b, &pb); err.failure())
    return err;
  pb.means_out = means_out->typed_data();
  pb.logw_out = logw_out->typed_data();
  return Run(pool, pb, TiltedTiles);
}

ffi::Error TiltedLseImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> means,
                         ffi::Buffer<ffi::F32> logw, ffi::Buffer<ffi::F32> point,
                         ffi::Buffer<ffi::F32> denom, ffi::Buffer<ffi::F32> offset,
                         ffi::ResultBuffer<ffi::F32> out) {
  Problem pb;
  if (ffi::Error err = TiltProblem(means, logw, point, denom, offset, offset, &pb); err.failure())
    return err;
  pb.lse_out = out->typed_data();
  return Run(pool, pb, TiltedTiles);
}

ffi::Error TiltedMeanImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> means,
                          ffi::Buffer<ffi::F32> logw, ffi::Buffer<ffi::F32> point,
                          ffi::Buffer<ffi::F32> denom, ffi::Buffer<ffi::F32> a,
                          ffi::Buffer<ffi::F32> b, ffi::ResultBuffer<ffi::F32> out) {
  Problem pb;
  if (ffi::Error err = TiltProblem(means, logw, point, denom, a, b, &pb); err.failure())
    return err;
  pb.mean_out = out->typed_data();
  return Run(pool, pb, TiltedTiles);
}

// The FFI signature of every kernel: XLA's intra-op thread pool, then N float32 operands and
// M >= 1 float32 results. (A Binding only moves, and privately: each step returns a temporary.)
using F32Buffer = ffi::Buffer<ffi::F32>;
template <int N, int M, typename Binding>
auto F32Signature(Binding&& binding) {
  static_assert(M >= 1);
  if constexpr (N > 0)
    return F32Signature<N - 1, M>(std::move(binding).template Arg<F32Buffer>());
  else if constexpr (M > 1)
    return F32Signature<0, M - 1>(std::move(binding).template Ret<F32Buffer>());
  else
    return std::move(binding).template Ret<F32Buffer>();
}

}  // namespace

// (the signature in parentheses: its template arguments' comma would split the macro's arguments)
#define GMFLOW_KERNEL(name, impl, operands, results) \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(                     \
      name, impl, (F32Signature<operands, results>(ffi::Ffi::Bind().Ctx<ffi::ThreadPool>())))

GMFLOW_KERNEL(GmflowGmMean, GmMeanImpl, 2, 1);          // means, logw -> mean
GMFLOW_KERNEL(GmflowGmMoments, GmMomentsImpl, 3, 2);    // means, logw, var0 -> mean, var
GMFLOW_KERNEL(GmflowGmProduct, GmProductImpl, 6, 2);    // means, logw, y, d, a, b -> means, logw
GMFLOW_KERNEL(GmflowTiltedLse, TiltedLseImpl, 5, 1);    // means, logw, y, d, offset -> lse
GMFLOW_KERNEL(GmflowTiltedMean, TiltedMeanImpl, 6, 1);  // means, logw, y, d, a, b -> mean
