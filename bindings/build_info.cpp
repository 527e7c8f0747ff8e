// tactic._core.build_info(): what this build holds and what each visible GPU can use of it.
#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>

#include "tactic/build_info.hpp"

namespace nb = nanobind;

void export_build_info(nb::module_& m) {
  m.def(
      "build_info",
      []() {
        const tactic::BuildInfo b = tactic::build_info();
        nb::dict d;
        d["version"] = b.version;
        d["with_cuda"] = b.with_cuda;
        d["with_openmp"] = b.with_openmp;
        d["cuda_archs"] = b.cuda_archs;
        d["cuda_compiler"] = b.cuda_compiler;
        nb::list devices;
        for (const tactic::DeviceFeatures& f : tactic::device_features()) {
          nb::dict e;
          e["device"] = f.device;
          e["name"] = f.name;
          e["compute_capability"] = f.compute_capability;
          e["sm_count"] = f.sm_count;
          e["kernel_arch"] = f.kernel_arch;
          e["programmatic_dependent_launch"] = f.programmatic_dependent_launch;
          e["thread_block_clusters"] = f.thread_block_clusters;
          e["tensor_core_attention"] = f.tensor_core_attention;
          e["warning"] = f.warning;
          devices.append(e);
        }
        d["devices"] = devices;
        return d;
      },
      "build_info() -> dict\n\n"
      "What this build holds: version, with_cuda, with_openmp, cuda_archs (the CUDA architectures\n"
      "compiled, e.g. '80 90'), cuda_compiler, and devices: for each visible GPU its name,\n"
      "compute_capability (90 for sm_90), sm_count, kernel_arch (the architecture this build's\n"
      "kernels run as there), which kernel features it uses (programmatic_dependent_launch,\n"
      "thread_block_clusters, tensor_core_attention) and a warning where the GPU has a feature\n"
      "the kernels were not built for.");
}
