// oneDNN's convolution backward-weights primitive as an XLA FFI handler: the kernel
// gradients of `layers.conv_onednn` where the `onednn` extra is installed
// (models/onednn_kernel_grad.py compiles this file on first use and registers it; see
// docs/architecture.md, "oneDNN convolutions").
//
// x: (N, H, W, Cin) float32, g: (N, H', W', Cout) float32 -> dk: (kh, kw, Cin, Cout), the
// kernel gradient of the cross-correlation with strides (sh, sw) and zero padding
// (pt, pb, pl, pr). Both operands are read in place (oneDNN's nhwc); XLA:CPU's own kernel
// gradient (Eigen) needs both transposed first. Primitives are made once per shape and kept
// for the process (making one JIT-compiles its kernel).
#include <cstdint>
#include <exception>
#include <string>
#include <map>
#include <mutex>
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
  memory::desc hwio;
};

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
  memory::desc hwio({co, ci, kh, kw}, f32, Tag::hwio);
  auto hint = dnnl::convolution_forward::primitive_desc(
      Engine(), dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct, src,
      any_weights, diff_dst, strides, pad_lo, pad_hi);
  auto pd = dnnl::convolution_backward_weights::primitive_desc(
      Engine(), dnnl::algorithm::convolution_direct, src, any_weights, diff_dst, strides,
      pad_lo, pad_hi, hint);
  Primitive p{dnnl::convolution_backward_weights(pd), pd.diff_weights_desc(), hwio};
  return cache.emplace(key, std::move(p)).first->second;
}

ffi::Error KernelGradUnchecked(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> g,
                      ffi::ResultBuffer<ffi::F32> dk, int64_t sh, int64_t sw, int64_t pt,
                      int64_t pb, int64_t pl, int64_t pr) {
  const auto xd = x.dimensions(), gd = g.dimensions(), kd = dk->dimensions();
  if (xd.size() != 4 || gd.size() != 4 || kd.size() != 4) {
    return ffi::Error::InvalidArgument("x, g and dk must be 4-D (NHWC, NHWC, HWIO)");
  }
  Primitive& p = Get({xd[0], xd[1], xd[2], xd[3], gd[1], gd[2], gd[3], kd[0], kd[1], sh, sw,
                      pt, pb, pl, pr});
  const auto f32 = memory::data_type::f32;
  memory src(memory::desc({xd[0], xd[3], xd[1], xd[2]}, f32, Tag::nhwc), Engine(),
             x.typed_data());
  memory diff_dst(memory::desc({gd[0], gd[3], gd[1], gd[2]}, f32, Tag::nhwc), Engine(),
                  g.typed_data());
  memory out(p.hwio, Engine(), dk->typed_data());
  dnnl::stream stream(Engine());
  if (p.conv_weights == p.hwio) {
    p.conv.execute(stream, {{DNNL_ARG_SRC, src}, {DNNL_ARG_DIFF_DST, diff_dst},
                            {DNNL_ARG_DIFF_WEIGHTS, out}});
  } else {
    memory blocked(p.conv_weights, Engine());
    p.conv.execute(stream, {{DNNL_ARG_SRC, src}, {DNNL_ARG_DIFF_DST, diff_dst},
                            {DNNL_ARG_DIFF_WEIGHTS, blocked}});
    dnnl::reorder(blocked, out).execute(stream, blocked, out);
  }
  stream.wait();
  return ffi::Error::Success();
}

// No C++ exception may cross into XLA: oneDNN's (dnnl::error: an unsupported shape, no
// memory) become the call's error, which JAX raises in Python.
ffi::Error KernelGrad(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> g,
                      ffi::ResultBuffer<ffi::F32> dk, int64_t sh, int64_t sw, int64_t pt,
                      int64_t pb, int64_t pl, int64_t pr) {
  try {
    return KernelGradUnchecked(x, g, dk, sh, sw, pt, pb, pl, pr);
  } catch (const std::exception& e) {
    return ffi::Error::Internal(std::string("oneDNN kernel gradient: ") + e.what());
  }
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(ArcvqOnednnKernelGrad, KernelGrad,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("sh")
                                  .Attr<int64_t>("sw")
                                  .Attr<int64_t>("pt")
                                  .Attr<int64_t>("pb")
                                  .Attr<int64_t>("pl")
                                  .Attr<int64_t>("pr"));
