// Bindings of the tissue-mask launchers: argument checks, device dispatch, GIL release.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>

#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "areas.h"
#include "gpfm/tissue.h"
#include "launch_glue.h"

namespace py = pybind11;

namespace gpfm::py_glue {

namespace {

#ifdef GPFM_WITH_CUDA
void* cuda_stream(intptr_t stream) { return reinterpret_cast<void*>(stream == -1 ? 0 : stream); }
#endif

void check_size(int64_t h, int64_t w, const char* name) {
  if (h < 1 || w < 1 || h * w >= std::numeric_limits<int32_t>::max())
    throw py::value_error(std::string(name) + ": image must be non-empty with fewer than 2^31 pixels");
}

// A C-contiguous 2-d view of `kind`; when h >= 0 its shape must be [h, w].
void expect_plane(const TensorView& v, const char* name, ScalarKind kind, int64_t h = -1, int64_t w = -1,
                  bool writable = false) {
  expect(v, name, kind, 2);
  if (!v.c_contiguous()) throw py::value_error(std::string(name) + ": expected a C-contiguous array, got " + v.describe());
  if (h >= 0 && (v.shape[0] != h || v.shape[1] != w))
    throw py::value_error(std::string(name) + ": expected shape [" + std::to_string(h) + ", " + std::to_string(w) +
                          "], got " + v.describe());
  if (writable && v.readonly) throw py::value_error(std::string(name) + ": array is read-only");
  if (h < 0) check_size(v.shape[0], v.shape[1], name);
}

TissueImage image_of(const TensorView& v) {
  expect(v, "src", ScalarKind::U8, 3);
  if ((v.shape[2] != 3 && v.shape[2] != 4) || v.strides[2] != 1)
    throw py::value_error("src: expected [H, W, 3] RGB or [H, W, 4] RGBA with packed channels, got " + v.describe());
  check_size(v.shape[0], v.shape[1], "src");
  return TissueImage{static_cast<const uint8_t*>(v.data), v.shape[0], v.shape[1], v.shape[2], v.strides[0],
                     v.strides[1]};
}

int odd_size(int k, const char* name) {
  if (k < 1 || k % 2 == 0 || k > 255) throw py::value_error(std::string(name) + ": must be an odd size in 1..255, got " + std::to_string(k));
  return k;
}

MorphOp morph_op(const std::string& op) {
  if (op == "dilate") return MorphOp::Dilate;
  if (op == "erode") return MorphOp::Erode;
  if (op == "close") return MorphOp::Close;
  if (op == "open") return MorphOp::Open;
  throw py::value_error("op: expected 'dilate', 'erode', 'close' or 'open', got '" + op + "'");
}

void tissue_score(const py::handle& src_obj, const py::handle& dst_obj, int dark_threshold, intptr_t stream) {
  const TensorView src = view_of(src_obj, "src", stream), dst = view_of(dst_obj, "dst", stream);
  const TissueImage img = image_of(src);
  expect_plane(dst, "dst", ScalarKind::U8, img.h, img.w, true);
  const bool cuda = same_device(src, dst, "tissue_score");
  py::gil_scoped_release release;
#ifdef GPFM_WITH_CUDA
  if (cuda) return check_cuda(tissue_score_cuda(img, static_cast<uint8_t*>(dst.data), dark_threshold, cuda_stream(stream)), "tissue_score");
#endif
  (void)cuda;
  tissue_score_cpu(img, static_cast<uint8_t*>(dst.data), dark_threshold);
}

void median_blur(const py::handle& src_obj, const py::handle& dst_obj, int k, intptr_t stream) {
  const TensorView src = view_of(src_obj, "src", stream), dst = view_of(dst_obj, "dst", stream);
  expect_plane(src, "src", ScalarKind::U8);
  expect_plane(dst, "dst", ScalarKind::U8, src.shape[0], src.shape[1], true);
  odd_size(k, "k");
  const bool cuda = same_device(src, dst, "median_blur");
  const auto* in = static_cast<const uint8_t*>(src.data);
  auto* out = static_cast<uint8_t*>(dst.data);
  py::gil_scoped_release release;
#ifdef GPFM_WITH_CUDA
  if (cuda) return check_cuda(median_blur_cuda(in, out, src.shape[0], src.shape[1], k, cuda_stream(stream)), "median_blur");
#endif
  (void)cuda;
  median_blur_cpu(in, out, src.shape[0], src.shape[1], k);
}

void histogram256(const py::handle& src_obj, const py::handle& hist_obj, intptr_t stream) {
  const TensorView src = view_of(src_obj, "src", stream), hist = view_of(hist_obj, "hist", stream);
  expect_plane(src, "src", ScalarKind::U8);
  expect(hist, "hist", ScalarKind::I64, 1);
  if (hist.shape[0] != 256 || !hist.c_contiguous() || hist.readonly)
    throw py::value_error("hist: expected a writable contiguous int64[256], got " + hist.describe());
  const bool cuda = same_device(src, hist, "histogram256");
  const auto* in = static_cast<const uint8_t*>(src.data);
  auto* out = static_cast<int64_t*>(hist.data);
  const int64_t n = src.numel();
  py::gil_scoped_release release;
#ifdef GPFM_WITH_CUDA
  if (cuda) return check_cuda(histogram256_cuda(in, n, out, cuda_stream(stream)), "histogram256");
#endif
  (void)cuda;
  histogram256_cpu(in, n, out);
}

int otsu_threshold(const py::handle& hist_obj) {
  const TensorView hist = view_of(hist_obj, "hist");
  expect(hist, "hist", ScalarKind::I64, 1);
  if (hist.shape[0] != 256 || !hist.c_contiguous() || hist.on_cuda)
    throw py::value_error("hist: expected a contiguous host int64[256], got " + hist.describe());
  return tissue::otsu_threshold(static_cast<const int64_t*>(hist.data));
}

void morphology(const py::handle& src_obj, const py::handle& dst_obj, const std::string& op, int k, intptr_t stream) {
  const TensorView src = view_of(src_obj, "src", stream), dst = view_of(dst_obj, "dst", stream);
  expect_plane(src, "src", ScalarKind::U8);
  expect_plane(dst, "dst", ScalarKind::U8, src.shape[0], src.shape[1], true);
  const MorphOp mop = morph_op(op);
  odd_size(k, "k");
  const bool cuda = same_device(src, dst, "morphology");
  const auto* in = static_cast<const uint8_t*>(src.data);
  auto* out = static_cast<uint8_t*>(dst.data);
  py::gil_scoped_release release;
#ifdef GPFM_WITH_CUDA
  if (cuda) return check_cuda(morphology_cuda(in, out, src.shape[0], src.shape[1], mop, k, cuda_stream(stream)), "morphology");
#endif
  (void)cuda;
  morphology_cpu(in, out, src.shape[0], src.shape[1], mop, k);
}

void filter_components(const py::handle& src_obj, const py::handle& dst_obj, int64_t min_tissue_px,
                       int64_t min_hole_px, intptr_t stream) {
  const TensorView src = view_of(src_obj, "src", stream), dst = view_of(dst_obj, "dst", stream);
  expect_plane(src, "src", ScalarKind::U8);
  expect_plane(dst, "dst", ScalarKind::U8, src.shape[0], src.shape[1], true);
  const bool cuda = same_device(src, dst, "filter_components");
  const auto* in = static_cast<const uint8_t*>(src.data);
  auto* out = static_cast<uint8_t*>(dst.data);
  py::gil_scoped_release release;
#ifdef GPFM_WITH_CUDA
  if (cuda)
    return check_cuda(filter_components_cuda(in, out, src.shape[0], src.shape[1], min_tissue_px, min_hole_px, cuda_stream(stream)),
                      "filter_components");
#endif
  (void)cuda;
  filter_components_cpu(in, out, src.shape[0], src.shape[1], min_tissue_px, min_hole_px);
}

void integral_image(const py::handle& mask_obj, const py::handle& sat_obj, intptr_t stream) {
  const TensorView mask = view_of(mask_obj, "mask", stream), sat = view_of(sat_obj, "sat", stream);
  expect_plane(mask, "mask", ScalarKind::U8);
  expect_plane(sat, "sat", ScalarKind::I32, mask.shape[0] + 1, mask.shape[1] + 1, true);
  const bool cuda = same_device(mask, sat, "integral_image");
  const auto* in = static_cast<const uint8_t*>(mask.data);
  auto* out = static_cast<int32_t*>(sat.data);
  py::gil_scoped_release release;
#ifdef GPFM_WITH_CUDA
  if (cuda) return check_cuda(integral_image_cuda(in, out, mask.shape[0], mask.shape[1], cuda_stream(stream)), "integral_image");
#endif
  (void)cuda;
  integral_image_cpu(in, out, mask.shape[0], mask.shape[1]);
}

// With mask, sat and level omitted (host input only), the outputs are allocated here and returned
// as (mask, sat, level): a thumbnail takes about a hundred microseconds, so the three arrays and
// views the caller would otherwise make are a noticeable share of the call.
py::object segment_tissue(const py::handle& src_obj, const py::handle& mask_obj, const py::handle& sat_obj,
                          const py::handle& level_obj, int dark_threshold, int median_k, int fixed_threshold,
                          int min_threshold, int close_k, int open_k, int64_t min_tissue_px, int64_t min_hole_px,
                          intptr_t stream) {
  const TensorView src = view_of(src_obj, "src", stream);
  const TissueImage img = image_of(src);
  const MaskParams p{dark_threshold, odd_size(median_k, "median_k"), fixed_threshold, min_threshold,
                     odd_size(close_k, "close_k"), odd_size(open_k, "open_k"), min_tissue_px, min_hole_px};
  if (mask_obj.is_none() && sat_obj.is_none() && level_obj.is_none()) {
    if (src.on_cuda) throw py::value_error("segment_tissue: give mask, sat and level for a CUDA thumbnail");
    py::array_t<uint8_t> mask({img.h, img.w});
    py::array_t<int32_t> sat({img.h + 1, img.w + 1});
    uint8_t* m = mask.mutable_data();
    int32_t* t = sat.mutable_data();
    int level;
    {
      py::gil_scoped_release release;
      level = segment_tissue_cpu(img, p, m, t);
    }
    return py::make_tuple(mask, sat, level);
  }
  const TensorView mask = view_of(mask_obj, "mask", stream), sat = view_of(sat_obj, "sat", stream);
  const TensorView level = view_of(level_obj, "level", stream);
  expect_plane(mask, "mask", ScalarKind::U8, img.h, img.w, true);
  expect_plane(sat, "sat", ScalarKind::I32, img.h + 1, img.w + 1, true);
  expect(level, "level", ScalarKind::I32, 1);
  if (level.shape[0] != 1 || level.readonly) throw py::value_error("level: expected a writable int32[1], got " + level.describe());
  const bool cuda = same_device(src, mask, "segment_tissue") && same_device(src, sat, "segment_tissue") &&
                    same_device(src, level, "segment_tissue");
  auto* m = static_cast<uint8_t*>(mask.data);
  auto* s = static_cast<int32_t*>(sat.data);
  auto* l = static_cast<int32_t*>(level.data);
  (void)cuda;
  {
    py::gil_scoped_release release;
#ifdef GPFM_WITH_CUDA
    if (cuda)
      check_cuda(segment_tissue_cuda(img, p, m, s, l, cuda_stream(stream)), "segment_tissue");
    else
#endif
      *l = segment_tissue_cpu(img, p, m, s);
  }
  return py::none();
}

py::tuple patch_grid(const py::handle& sat_obj, int64_t width, int64_t height, double stride, double size,
                     double scale_x, double scale_y, double threshold) {
  const TensorView sat = view_of(sat_obj, "sat");
  expect_plane(sat, "sat", ScalarKind::I32);
  if (sat.on_cuda) throw py::value_error("patch_grid: expected a host summed-area table (the lattice is read on the CPU)");
  if (width < 1 || height < 1 || !(stride > 0) || !(size > 0) || !(scale_x > 0) || !(scale_y > 0))
    throw py::value_error("patch_grid: width, height, stride, size and scales must be positive");
  const int64_t n_max = static_cast<int64_t>(std::ceil(width / stride)) * static_cast<int64_t>(std::ceil(height / stride));
  std::vector<int64_t> xy(2 * n_max);
  std::vector<float> f(n_max);
  const PatchLattice lattice{width, height, stride, size, scale_x, scale_y, threshold};
  const auto* table = static_cast<const int32_t*>(sat.data);
  int64_t n;
  {
    py::gil_scoped_release release;
    n = patch_grid_cpu(table, sat.shape[0] - 1, sat.shape[1] - 1, lattice, xy.data(), f.data());
  }
  py::array_t<int64_t> coords({n, int64_t{2}});
  py::array_t<float> fractions(n);
  std::copy(xy.begin(), xy.begin() + 2 * n, coords.mutable_data());
  std::copy(f.begin(), f.begin() + n, fractions.mutable_data());
  return py::make_tuple(coords, fractions);
}

}  // namespace

void init_tissue(py::module_& m) {
  m.def("tissue_score", &tissue_score, py::arg("src"), py::arg("dst"), py::arg("dark_threshold"), py::arg("stream") = -1,
        "uint8 [H, W, 3|4] RGB(A) -> uint8 [H, W] into dst: OpenCV's HSV saturation, 0 where max(R, G, B) < "
        "dark_threshold; alpha is composited onto white.");
  m.def("median_blur", &median_blur, py::arg("src"), py::arg("dst"), py::arg("k"), py::arg("stream") = -1,
        "Exact k x k median (k odd) of a uint8 [H, W] plane, borders replicated (as cv2.medianBlur).");
  m.def("histogram256", &histogram256, py::arg("src"), py::arg("hist"), py::arg("stream") = -1,
        "256-bin histogram of a uint8 plane written to an int64[256].");
  m.def("otsu_threshold", &otsu_threshold, py::arg("hist"),
        "Otsu's level of a host int64[256] histogram, as cv2.threshold(THRESH_OTSU) computes it.");
  m.def("morphology", &morphology, py::arg("src"), py::arg("dst"), py::arg("op"), py::arg("k"), py::arg("stream") = -1,
        "Binary 'dilate', 'erode', 'close' or 'open' of a uint8 plane (nonzero = 1) with the k x k elliptical "
        "element of cv2.getStructuringElement(MORPH_ELLIPSE); pixels outside the image are ignored. dst is 0/1.");
  m.def("filter_components", &filter_components, py::arg("src"), py::arg("dst"), py::arg("min_tissue_px"),
        py::arg("min_hole_px"), py::arg("stream") = -1,
        "Drop 8-connected tissue components smaller than min_tissue_px, then fill 4-connected holes (background "
        "not touching the border) smaller than min_hole_px. dst is 0/1.");
  m.def("integral_image", &integral_image, py::arg("mask"), py::arg("sat"), py::arg("stream") = -1,
        "Summed-area table int32 [H + 1, W + 1] of a uint8 plane's nonzero pixels.");
  m.def("segment_tissue", &segment_tissue, py::arg("src"), py::arg("mask") = py::none(), py::arg("sat") = py::none(),
        py::arg("level") = py::none(), py::arg("dark_threshold"), py::arg("median_k"), py::arg("fixed_threshold"),
        py::arg("min_threshold"), py::arg("close_k"), py::arg("open_k"), py::arg("min_tissue_px"),
        py::arg("min_hole_px"), py::arg("stream") = -1,
        "The whole mask chain (score, median, Otsu or fixed level, close, open, components, integral) in one call. "
        "Given mask, sat and level, the outputs are written there (the level used to level[0]): host arrays run on "
        "the CPU threads with the GIL released, CUDA arrays on `stream` without synchronising. Omitted (host src "
        "only), they are allocated and (mask uint8 [H, W], sat int32 [H + 1, W + 1], level) is returned.");
  m.def("patch_grid", &patch_grid, py::arg("sat"), py::arg("width"), py::arg("height"), py::arg("stride"),
        py::arg("size"), py::arg("scale_x"), py::arg("scale_y"), py::arg("threshold"),
        "(coords int64 [N, 2], fractions float32 [N]): the row-major level-0 top-lefts round(i * stride) of a "
        "width x height image whose size x size patch has a tissue fraction >= threshold on the summed-area table "
        "sat (one mask pixel = scale_x x scale_y level-0 pixels), and those fractions.");
}

}  // namespace gpfm::py_glue
