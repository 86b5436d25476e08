# End-to-end tests of the worker's blkif backend: bp-xenhost + blockplaned --xen-platform=emulated
# + the userspace blkfront (harness handshake and requests).
blockplane_gtest(blkback_e2e_test
  SOURCES blkback_e2e_test.cc
  LIBS blockplane_xen_e2e_fixture blockplane_harness_xen_testing blockplane_xen blockplane_blkif
       blockplane_controller_fixture
  LABELS integration xen)
target_compile_definitions(blkback_e2e_test PRIVATE BP_XENHOST_PATH="$<TARGET_FILE:bp-xenhost>")
add_dependencies(blkback_e2e_test bp-xenhost blockplaned blockplane-worker)
