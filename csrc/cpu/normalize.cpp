#include "gpfm/launchers.h"
#include "gpfm/parallel.h"

namespace gpfm {
namespace {

template <OutDType D>
void normalize_rows(const U8ImageBatch& src, typename OutStore<D>::type* dst, const Normalize& norm, int64_t row_begin,
                    int64_t row_end) {
  const int64_t plane = src.h * src.w;
  for (int64_t r = row_begin; r < row_end; ++r) {
    const int64_t n = r / src.h, y = r % src.h;
    const uint8_t* in = src.data + n * src.sn + y * src.sy;
    for (int c = 0; c < 3; ++c) {
      auto* out = dst + (n * 3 + c) * plane + y * src.w;
      for (int64_t x = 0; x < src.w; ++x) OutStore<D>::store(out + x, normalize_value(norm, c, in[x * src.sx + c]));
    }
  }
}

template <OutDType D>
void launch(const U8ImageBatch& src, void* dst, const Normalize& norm) {
  auto* out = static_cast<typename OutStore<D>::type*>(dst);
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(src.w, 1));
  parallel_for(src.n * src.h, grain, [&](int64_t b, int64_t e) { normalize_rows<D>(src, out, norm, b, e); });
}

}  // namespace

void normalize_nchw_cpu(const U8ImageBatch& src, void* dst, OutDType dtype, const Normalize& norm) {
  switch (dtype) {
    case OutDType::F32: return launch<OutDType::F32>(src, dst, norm);
    case OutDType::F16: return launch<OutDType::F16>(src, dst, norm);
    case OutDType::BF16: return launch<OutDType::BF16>(src, dst, norm);
  }
}

}  // namespace gpfm
