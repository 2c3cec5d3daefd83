// The emulator's count of kernel launches, as the op emulated_launches() of
// the emulated library, for the tests that count launches per segment; and
// its block order, set by emulate_reversed_blocks(bool).
#include <torch/library.h>

#include "cuda_emulator.h"

namespace gunn_ext {

TORCH_LIBRARY_FRAGMENT(gunn_ext, m) {
  m.def("emulated_launches() -> int", [] { return cuda::emulator::launches.load(); });
  m.def("emulate_reversed_blocks(bool reversed) -> ()",
        [](bool reversed) { cuda::emulator::reversed.store(reversed); });
}

}  // namespace gunn_ext
