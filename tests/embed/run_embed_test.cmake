# ctest driver (registered by the top-level CMakeLists with TACTIC_BUILD_TESTS=ON): install the
# already built tree into a scratch prefix, build tests/embed against that prefix alone, and
# run both demos (shared and static). Any failing step fails the test.
foreach(v TACTIC_BUILD_DIR TACTIC_EMBED_SOURCE TACTIC_SCRATCH TACTIC_GENERATOR TACTIC_CXX_COMPILER)
  if(NOT DEFINED ${v})
    message(FATAL_ERROR "run_embed_test.cmake: -D${v}=... is required")
  endif()
endforeach()
if(NOT TACTIC_BUILD_TYPE)
  set(TACTIC_BUILD_TYPE Release)
endif()

function(step)
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE rc)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "embed test: `${ARGN}` failed (${rc})")
  endif()
endfunction()

set(prefix ${TACTIC_SCRATCH}/prefix)
set(build ${TACTIC_SCRATCH}/build)
file(REMOVE_RECURSE ${TACTIC_SCRATCH})
step(${CMAKE_COMMAND} --install ${TACTIC_BUILD_DIR} --prefix ${prefix} --config ${TACTIC_BUILD_TYPE})
step(${CMAKE_COMMAND} -S ${TACTIC_EMBED_SOURCE} -B ${build} -G ${TACTIC_GENERATOR}
     -DCMAKE_PREFIX_PATH=${prefix} -DCMAKE_BUILD_TYPE=${TACTIC_BUILD_TYPE}
     -DCMAKE_CXX_COMPILER=${TACTIC_CXX_COMPILER})
step(${CMAKE_COMMAND} --build ${build} --config ${TACTIC_BUILD_TYPE})
foreach(exe embed_demo embed_demo_static)
  # Single-config generators put the executable in ${build}; multi-config ones in a subfolder.
  find_program(path_${exe} ${exe} PATHS ${build} ${build}/${TACTIC_BUILD_TYPE} NO_DEFAULT_PATH REQUIRED)
  step(${path_${exe}})
endforeach()
