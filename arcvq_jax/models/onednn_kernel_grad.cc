// oneDNN's convolution backward-weights primitive as an XLA FFI handler: the kernel
// gradients of `layers.conv_onednn` where the `onednn` extra is installed
// (models/onednn_kernel_grad.py compiles this file on first use and registers it; see
// docs/architecture.md, "oneDNN convolutions").
//
// x: (N, H, W, Cin) float32, g: (N, H', W', Cout) float32 -> dk: (kh, kw, Cin, Cout), the
// kernel gradient of the cross-correlation with strides (sh, sw) and zero padding
// (pt, pb, pl, pr). Both operands are read in place (oneDNN's nhwc); XLA:CPU's own kernel
// gradient (Eigen) needs both transposed first. The batch is split into chunks that XLA's own
// intra-op threads (the FFI's thread pool) take, one single-threaded oneDNN call each, and
// their gradients are summed: oneDNN's OpenMP threads beside XLA's busy ones ran the step
// slower (docs/architecture.md). Primitives are made once per shape and kept for the process
// (making one JIT-compiles its kernel).
#include <omp.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dnnl::memory;
using Tag = memory::format_tag;

namespace {

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

struct Primitive {
  dnnl::convolution_backward_weights conv;
  memory::desc conv_weights;  // the layout oneDNN chose for the gradient
  memory::desc scratchpad;
};

// key: n, h, w, ci, ho, wo, co, kh, kw, sh, sw, pt, pb, pl, pr, and the OpenMP threads the
// primitive is made for (oneDNN sizes its work split by them).
Primitive& Get(const std::vector<int64_t>& key) {
  static std::map<std::vector<int64_t>, Primitive> cache;
  static std::mutex mu;
  std::lock_guard<std::mutex> lock(mu);
  auto it = cache.find(key);
  if (it != cache.end()) return it->second;
  const int64_t n = key[0], h = key[1], w = key[2], ci = key[3], ho = key[4], wo = key[5],
                co = key[6], kh = key[7], kw = key[8];
  const memory::dims strides{key[9], key[10]}, pad_lo{key[11], key[13]}, pad_hi{key[12], key[14]};
  const auto f32 = memory::data_type::f32;
  memory::desc src({n, ci, h, w}, f32, Tag::nhwc);
  memory::desc diff_dst({n, co, ho, wo}, f32, Tag::nhwc);
  memory::desc any_weights({co, ci, kh, kw}, f32, Tag::any);
  // A scratchpad of the caller's per execution: calls may run on several threads at once.
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  auto hint = dnnl::convolution_forward::primitive_desc(
      Engine(), dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct, src,
      any_weights, diff_dst, strides, pad_lo, pad_hi);
  auto pd = dnnl::convolution_backward_weights::primitive_desc(
      Engine(), dnnl::algorithm::convolution_direct, src, any_weights, diff_dst, strides,
      pad_lo, pad_hi, hint, attr);
  Primitive p{dnnl::convolution_backward_weights(pd), pd.diff_weights_desc(),
              pd.scratchpad_desc()};
  return cache.emplace(key, std::move(p)).first->second;
}

struct Shapes {
  int64_t n, h, w, ci, ho, wo, co, kh, kw;
  int64_t sh, sw, pt, pb, pl, pr;
};

// dk of the images [begin, end) of the batch into `out`, in the weights layout the primitive
// chose (`layout`).
void RunChunk(const Shapes& s, const float* x, const float* g, int64_t begin, int64_t end,
              memory::desc* layout, std::vector<float>* out) {
  const int64_t n = end - begin;
  Primitive& p = Get({n, s.h, s.w, s.ci, s.ho, s.wo, s.co, s.kh, s.kw, s.sh, s.sw, s.pt, s.pb,
                      s.pl, s.pr, omp_get_max_threads()});
  const auto f32 = memory::data_type::f32;
  memory src(memory::desc({n, s.ci, s.h, s.w}, f32, Tag::nhwc), Engine(),
             const_cast<float*>(x + begin * s.h * s.w * s.ci));
  memory diff_dst(memory::desc({n, s.co, s.ho, s.wo}, f32, Tag::nhwc), Engine(),
                  const_cast<float*>(g + begin * s.ho * s.wo * s.co));
  out->resize(p.conv_weights.get_size() / sizeof(float));
  memory weights(p.conv_weights, Engine(), out->data());
  memory scratch(p.scratchpad, Engine());
  dnnl::stream stream(Engine());
  p.conv.execute(stream, {{DNNL_ARG_SRC, src},
                          {DNNL_ARG_DIFF_DST, diff_dst},
                          {DNNL_ARG_DIFF_WEIGHTS, weights},
                          {DNNL_ARG_SCRATCHPAD, scratch}});
  stream.wait();
  *layout = p.conv_weights;
}

void ToHwio(const memory::desc& layout, std::vector<float>& blocked, const Shapes& s,
            float* dk) {
  memory::desc hwio({s.co, s.ci, s.kh, s.kw}, memory::data_type::f32, Tag::hwio);
  memory from(layout, Engine(), blocked.data()), to(hwio, Engine(), dk);
  dnnl::stream stream(Engine());
  dnnl::reorder(from, to).execute(stream, from, to);
  stream.wait();
}

Shapes Read(ffi::Buffer<ffi::F32>& x, ffi::Buffer<ffi::F32>& g, ffi::ResultBuffer<ffi::F32>& dk,
            int64_t sh, int64_t sw, int64_t pt, int64_t pb, int64_t pl, int64_t pr) {
  const auto xd = x.dimensions(), gd = g.dimensions(), kd = dk->dimensions();  // 4-D (Python)
  return {xd[0], xd[1], xd[2], xd[3], gd[1], gd[2], gd[3], kd[0], kd[1], sh, sw, pt, pb, pl, pr};
}

// One call's state, shared by the caller and the tasks it schedules on XLA's intra-op threads
// (a task that starts after the last chunk was taken finds none and ends).
struct Shared {
  Shapes s;
  const float* x;
  const float* g;
  int64_t chunks, chunk;
  std::vector<std::vector<float>> partial;
  std::vector<memory::desc> layout;
  std::atomic<int64_t> next{0};
  int64_t done = 0;
  std::string error;
  std::mutex mu;
  std::condition_variable cv;
};

void Work(const std::shared_ptr<Shared>& st) {
  // This thread's OpenMP setting (oneDNN runs here single-threaded), restored after: the
  // caller may be a thread of the program's own that uses OpenMP otherwise.
  const int saved_threads = omp_get_max_threads();
  omp_set_num_threads(1);
  for (int64_t i; (i = st->next.fetch_add(1)) < st->chunks;) {
    std::string error;
    try {
      const int64_t begin = i * st->chunk, end = std::min(st->s.n, begin + st->chunk);
      RunChunk(st->s, st->x, st->g, begin, end, &st->layout[i], &st->partial[i]);
    } catch (const std::exception& e) {
      error = e.what();
    }
    std::lock_guard<std::mutex> lock(st->mu);
    if (!error.empty()) st->error = error;
    if (++st->done == st->chunks) st->cv.notify_all();
  }
  omp_set_num_threads(saved_threads);
}

// The batch in chunks that XLA's own intra-op threads take (one single-threaded oneDNN call
// each; no OpenMP team beside XLA's threads), the partial gradients summed, then HWIO.
ffi::Error KernelGrad(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> g,
                      ffi::ResultBuffer<ffi::F32> dk, int64_t sh, int64_t sw, int64_t pt,
                      int64_t pb, int64_t pl, int64_t pr, int64_t chunks_per_thread) {
  auto st = std::make_shared<Shared>();
  st->s = Read(x, g, dk, sh, sw, pt, pb, pl, pr);
  st->x = x.typed_data();
  st->g = g.typed_data();
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t want = std::max<int64_t>(1, std::min(st->s.n, threads * chunks_per_thread));
  st->chunk = (st->s.n + want - 1) / want;
  st->chunks = (st->s.n + st->chunk - 1) / st->chunk;
  st->partial.resize(st->chunks);
  st->layout.resize(st->chunks);
  for (int64_t t = 1; t < std::min(threads, st->chunks); ++t) pool.Schedule([st] { Work(st); });
  Work(st);
  {
    std::unique_lock<std::mutex> lock(st->mu);
    st->cv.wait(lock, [&] { return st->done == st->chunks; });
  }
  if (!st->error.empty()) return ffi::Error::Internal("oneDNN kernel gradient: " + st->error);
  // Chunks of other sizes may have chosen other weight layouts: then all go to HWIO first.
  const memory::desc hwio({st->s.co, st->s.ci, st->s.kh, st->s.kw}, memory::data_type::f32,
                          Tag::hwio);
  bool same = true;
  for (const auto& layout : st->layout) same = same && layout == st->layout[0];
  for (int64_t i = 0; !same && i < st->chunks; ++i) {
    std::vector<float> plain(st->partial[i].size());
    ToHwio(st->layout[i], st->partial[i], st->s, plain.data());
    st->partial[i].swap(plain);
    st->layout[i] = hwio;
  }
  std::vector<float>& sum = st->partial[0];
  for (int64_t i = 1; i < st->chunks; ++i) {
    const std::vector<float>& part = st->partial[i];
    for (size_t j = 0; j < sum.size(); ++j) sum[j] += part[j];
  }
  ToHwio(st->layout[0], sum, st->s, dk->typed_data());
  return ffi::Error::Success();
}

// No C++ exception may cross into XLA: oneDNN's (dnnl::error: an unsupported shape, no
// memory) become the call's error, which JAX raises in Python.
template <typename F>
ffi::Error Guarded(F&& f) {
  try {
    return f();
  } catch (const std::exception& e) {
    return ffi::Error::Internal(std::string("oneDNN kernel gradient: ") + e.what());
  }
}

ffi::Error Entry(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> g,
                 ffi::ResultBuffer<ffi::F32> dk, int64_t sh, int64_t sw, int64_t pt, int64_t pb,
                 int64_t pl, int64_t pr, int64_t chunks_per_thread) {
  return Guarded(
      [&] { return KernelGrad(pool, x, g, dk, sh, sw, pt, pb, pl, pr, chunks_per_thread); });
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(ArcvqOnednnKernelGrad, Entry,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("sh")
                                  .Attr<int64_t>("sw")
                                  .Attr<int64_t>("pt")
                                  .Attr<int64_t>("pb")
                                  .Attr<int64_t>("pl")
                                  .Attr<int64_t>("pr")
                                  .Attr<int64_t>("chunks_per_thread"));
