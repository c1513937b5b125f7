# Installed package: the libraries and headers (install rules next to each target in
# kernels/, comm/, src/), the `ringattn` CLI, the Python package (src/python/), and here
#   <libdir>/cmake/ringattn/   find_package(ringattn CONFIG): ringattn::kernels,
#                              ringattn::comm, ringattn::ringattn
#   <libdir>/pkgconfig/ringattn.pc
# Both are relocatable: `cmake --install <build> --prefix P` works for any P.
include(CMakePackageConfigHelpers)

set(RINGATTN_CMAKE_INSTALL_DIR ${CMAKE_INSTALL_LIBDIR}/cmake/ringattn)
install(EXPORT ringattnTargets NAMESPACE ringattn:: FILE ringattnTargets.cmake
        DESTINATION ${RINGATTN_CMAKE_INSTALL_DIR})
configure_package_config_file(${PROJECT_SOURCE_DIR}/cmake/ringattnConfig.cmake.in
                              ${PROJECT_BINARY_DIR}/cmake/ringattnConfig.cmake
                              INSTALL_DESTINATION ${RINGATTN_CMAKE_INSTALL_DIR})
# 0.x: a minor release may change the API, so only the same major.minor matches.
write_basic_package_version_file(${PROJECT_BINARY_DIR}/cmake/ringattnConfigVersion.cmake
                                 COMPATIBILITY SameMinorVersion)
install(FILES ${PROJECT_BINARY_DIR}/cmake/ringattnConfig.cmake
              ${PROJECT_BINARY_DIR}/cmake/ringattnConfigVersion.cmake
        DESTINATION ${RINGATTN_CMAKE_INSTALL_DIR})

# pkg-config: static libraries, so Cflags/Libs carry the OpenMP, MPI and thread flags
# of this build. prefix is found from the .pc file's own folder (${pcfiledir}).
set(RINGATTN_PC_INSTALL_DIR ${CMAKE_INSTALL_LIBDIR}/pkgconfig)
file(RELATIVE_PATH ringattn_pc_up /ringattn_root/${RINGATTN_PC_INSTALL_DIR} /ringattn_root)
set(RINGATTN_PC_PREFIX "\${pcfiledir}/${ringattn_pc_up}")
string(REGEX REPLACE "/$" "" RINGATTN_PC_PREFIX "${RINGATTN_PC_PREFIX}")
set(ringattn_pc_cflags ${OpenMP_CXX_FLAGS})
foreach(dir ${MPI_CXX_INCLUDE_DIRS})
  list(APPEND ringattn_pc_cflags "-I${dir}")
endforeach()
foreach(def ${MPI_CXX_COMPILE_DEFINITIONS})
  list(APPEND ringattn_pc_cflags "-D${def}")
endforeach()
list(APPEND ringattn_pc_cflags ${MPI_CXX_COMPILE_OPTIONS})
set(ringattn_pc_libs ${MPI_CXX_LINK_FLAGS} ${MPI_CXX_LIBRARIES} ${OpenMP_CXX_FLAGS}
                     ${CMAKE_THREAD_LIBS_INIT})
list(REMOVE_DUPLICATES ringattn_pc_cflags)
list(JOIN ringattn_pc_cflags " " RINGATTN_PC_CFLAGS)
list(JOIN ringattn_pc_libs " " RINGATTN_PC_LIBS)
configure_file(${PROJECT_SOURCE_DIR}/cmake/ringattn.pc.in ${PROJECT_BINARY_DIR}/cmake/ringattn.pc @ONLY)
install(FILES ${PROJECT_BINARY_DIR}/cmake/ringattn.pc DESTINATION ${RINGATTN_PC_INSTALL_DIR})
