#include <pybind11/pybind11.h>

#include <string>
#include <vector>

#include "areas.h"
#include "launch_glue.h"

namespace py = pybind11;

namespace gpfm::py_glue {

namespace {

// The decoded tiles: either one [T, h, w, 3] array (host or CUDA) or a list/tuple of host [h, w, 3]
// arrays (no stacking copy: the launcher reads them through a pointer table).
struct Tiles {
  TileRefs refs{};
  bool on_cuda = false;
  int device_id = 0;
  std::vector<TensorView> views;  // keep the arrays alive while the launcher runs
  std::vector<const uint8_t*> ptrs;
};

void check_tile_view(const TensorView& v, const char* name, int64_t h, int64_t w, int ndim) {
  expect(v, name, ScalarKind::U8, ndim);
  const size_t o = ndim - 3;
  if (v.shape[o] != h || v.shape[o + 1] != w || v.shape[o + 2] != 3 || v.strides[o + 2] != 1 || v.strides[o + 1] < 3)
    throw py::value_error(std::string(name) + ": expected " + (ndim == 4 ? "[T, " : "[") + std::to_string(h) + ", " +
                          std::to_string(w) + ", 3] RGB tiles with packed channels, got " + v.describe());
}

Tiles tiles_of(const py::handle& obj, int64_t h, int64_t w, intptr_t stream) {
  Tiles t;
  if (py::isinstance<py::list>(obj) || py::isinstance<py::tuple>(obj)) {
    const auto seq = py::reinterpret_borrow<py::sequence>(obj);
    for (size_t i = 0; i < seq.size(); ++i) {
      const std::string name = "tiles[" + std::to_string(i) + "]";
      TensorView v = view_of(seq[i], name.c_str(), stream);
      if (v.on_cuda) throw py::value_error(name + ": CUDA tiles must come as one stacked [T, h, w, 3] tensor");
      check_tile_view(v, name.c_str(), h, w, 3);
      if (!t.views.empty() && (v.strides[0] != t.refs.sy || v.strides[1] != t.refs.sx))
        throw py::value_error(name + ": every tile must have the same row and pixel strides, got " + v.describe());
      t.refs.sy = v.strides[0];
      t.refs.sx = v.strides[1];
      t.ptrs.push_back(static_cast<const uint8_t*>(v.data));
      t.views.push_back(std::move(v));
    }
    t.refs.n = static_cast<int64_t>(t.ptrs.size());
  } else {
    TensorView v = view_of(obj, "tiles", stream);
    check_tile_view(v, "tiles", h, w, 4);
    t.on_cuda = v.on_cuda;
    t.device_id = v.device_id;
    t.refs.stack = static_cast<const uint8_t*>(v.data);
    t.refs.n = v.shape[0];
    t.refs.sn = v.strides[0];
    t.refs.sy = v.strides[1];
    t.refs.sx = v.strides[2];
    if (!v.on_cuda)
      for (int64_t i = 0; i < t.refs.n; ++i) t.ptrs.push_back(t.refs.stack + i * t.refs.sn);
    t.views.push_back(std::move(v));
  }
  t.refs.ptrs = t.ptrs.data();
  t.refs.h = h;
  t.refs.w = w;
  return t;
}

void expect_on(const TensorView& v, const char* name, bool cuda, int device_id) {
  if (v.on_cuda != cuda || (cuda && v.device_id != device_id))
    throw py::value_error(std::string(name) + ": must be on the same device as the tiles, got " + v.describe());
}

void check_host_lut(const TensorView& lut, int64_t n_tiles) {
  const auto* p = static_cast<const int32_t*>(lut.data);
  for (int64_t i = 0, e = lut.numel(); i < e; ++i)
    if (p[i] < -1 || p[i] >= n_tiles)
      throw py::value_error("lut: entry " + std::to_string(p[i]) + " is not a tile index in [-1, " +
                            std::to_string(n_tiles) + ")");
}

void gather(const py::handle& tiles_obj, const py::handle& lut_obj, const py::handle& rects_obj,
            const py::handle& dst_obj, int tile_height, int tile_width, int src_width, int src_height,
            const py::sequence& mean,
            const py::sequence& std, const py::handle& background_obj, int white_level, intptr_t stream) {
  if (tile_height < 1 || tile_width < 1) throw py::value_error("tile_height and tile_width must be >= 1");
  if (src_width < 1 || src_height < 1) throw py::value_error("src_width and src_height must be >= 1");
  if (white_level < 0 || white_level > 255) throw py::value_error("white_level must be in [0, 255]");
  const Tiles tiles = tiles_of(tiles_obj, tile_height, tile_width, stream);
  const TensorView lut = view_of(lut_obj, "lut", stream);
  const TensorView rects = view_of(rects_obj, "rects", stream);
  const TensorView dst = view_of(dst_obj, "out", stream);
  expect(lut, "lut", ScalarKind::I32, 3);
  expect(rects, "rects", ScalarKind::I32, 2);
  const int64_t n = lut.shape[0];
  if (!lut.c_contiguous() || !rects.c_contiguous() || rects.shape[0] != n || rects.shape[1] != 4)
    throw py::value_error("lut and rects: expected C-contiguous int32 [N, rows, cols] and [N, 4], got " +
                          lut.describe() + " and " + rects.describe());
  if (lut.shape[1] * tile_height >= (int64_t{1} << 31) || lut.shape[2] * tile_width >= (int64_t{1} << 31))
    throw py::value_error("lut: a patch frame of " + lut.describe() + " tiles is too large");
  const OutDType dtype = out_dtype_of(dst, "out");
  if (dst.readonly) throw py::value_error("out: array is read-only");
  if (dst.shape.size() != 4 || dst.shape[0] != n || dst.shape[1] != 3 || dst.shape[2] != dst.shape[3] ||
      dst.shape[2] < 1 || !dst.c_contiguous())
    throw py::value_error("out: expected a C-contiguous [N, 3, S, S] array with N = " + std::to_string(n) +
                          " patches, got " + dst.describe());
  for (const TensorView* v : {&lut, &rects, &dst}) expect_on(*v, "lut, rects and out", tiles.on_cuda, tiles.device_id);
  float* background = nullptr;
  TensorView bg;
  if (!background_obj.is_none()) {
    bg = view_of(background_obj, "background", stream);
    expect(bg, "background", ScalarKind::F32, 1);
    if (bg.shape[0] != n || !bg.c_contiguous() || bg.readonly)
      throw py::value_error("background: expected a writable contiguous float32 [N] array, got " + bg.describe());
    expect_on(bg, "background", tiles.on_cuda, tiles.device_id);
    background = static_cast<float*>(bg.data);
  }
#ifndef GPFM_WITH_CUDA
  if (tiles.on_cuda) throw py::value_error("gather: this build of gpfm_engine._core has no CUDA launchers");
#endif
  if (!tiles.on_cuda) check_host_lut(lut, tiles.refs.n);
  const auto m = triple(mean, "mean"), s = triple(std, "std");
  const GatherPatches patches{static_cast<const int32_t*>(lut.data), static_cast<const int32_t*>(rects.data), n,
                              lut.shape[1], lut.shape[2]};
  const GatherParams params{src_width, src_height, static_cast<int>(dst.shape[2]), white_level, dtype,
                            make_normalize(m.data(), s.data())};
  py::gil_scoped_release release;
#ifdef GPFM_WITH_CUDA
  if (tiles.on_cuda) {
    check_cuda(gather_cuda(tiles.refs, patches, params, dst.data, background,
                           reinterpret_cast<void*>(stream == -1 ? 0 : stream)),
               "gather");
    return;
  }
#endif
  gather_cpu(tiles.refs, patches, params, dst.data, background);
}

}  // namespace

void init_gather(py::module_& m) {
  m.def("gather", &gather, py::arg("tiles"), py::arg("lut"), py::arg("rects"), py::arg("out"),
        py::arg("tile_height"), py::arg("tile_width"), py::arg("src_width"), py::arg("src_height"), py::arg("mean"),
        py::arg("std"), py::arg("background") = py::none(), py::arg("white_level") = 220, py::arg("stream") = -1,
        "Build normalized [N, 3, S, S] model input in `out` from decoded stored tiles in one pass: crop each "
        "patch's src_width x src_height rectangle (lut/rects, see gpfm_engine.gather), resize it to S x S exactly "
        "as PIL's antialiased BICUBIC does, normalize ((v / 255 - mean) / std). `tiles` is a [T, h, w, 3] uint8 "
        "array or a list of host [h, w, 3] arrays. `background` (float32 [N], optional) receives each patch's "
        "fraction of resampled pixels with all channels >= white_level. Host arrays run on the CPU threads with the GIL "
        "released; CUDA arrays run on `stream` without synchronising.");
}

}  // namespace gpfm::py_glue
