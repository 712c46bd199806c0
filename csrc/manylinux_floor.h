// The manylinux floor, glibc's part (docs/release.md, "The glibc floor"). On glibc systems
// setup.py force-includes this header (-include) ahead of everything else in every
// translation unit of both extensions, so no call site has to remember it. The rest of the
// floor (libstdc++ linked in privately) is in setup.py's manylinux_floor().
#pragma once

// glibc 2.29 gave exp, exp2, log, log2 and pow new symbol versions (GLIBC_2.29: the same
// functions without the old SVID error-handling wrapper). A module linked on a newer glibc
// binds the new versions and would not load on glibc < 2.29, so calls are bound to the
// x86-64 base version instead: on glibc >= 2.29 a wrapper around the same implementation
// (the same results; with -fno-math-errno we never read errno), on glibc 2.28 the only
// version, the one CPython's float ** uses there. A line for a function a unit does not
// call emits nothing.
#if defined(__x86_64__)
__asm__(".symver exp,exp@GLIBC_2.2.5");
__asm__(".symver exp2,exp2@GLIBC_2.2.5");
__asm__(".symver log,log@GLIBC_2.2.5");
__asm__(".symver log2,log2@GLIBC_2.2.5");
__asm__(".symver pow,pow@GLIBC_2.2.5");
// glibc 2.27 did the same for the float functions expf, exp2f, logf, log2f and powf (the
// softmax row passes call logf, csrc/norm_act_simd.h and attention_bindings.cpp): bound to
// the base version likewise, or the wheel's tag rises to manylinux_2_27.
__asm__(".symver expf,expf@GLIBC_2.2.5");
__asm__(".symver exp2f,exp2f@GLIBC_2.2.5");
__asm__(".symver logf,logf@GLIBC_2.2.5");
__asm__(".symver log2f,log2f@GLIBC_2.2.5");
__asm__(".symver powf,powf@GLIBC_2.2.5");
#endif

// GCC 12's libstdc++ (its headers' inline reference counts of shared_ptr, exception_ptr and
// the like, and the libstdc++.a code linked into the module) reads glibc 2.32's
// `__libc_single_threaded` to skip atomic instructions while the process has one thread;
// glibc's variable would make the module need glibc 2.32. This definition satisfies those
// references inside the module instead: hidden (never exported, so nothing outside sees
// it), weak (every unit carries it, the linker keeps one), and fixed at 0, "maybe
// multi-threaded": the reference counts always take the atomic path, which is correct in
// every process and what a process with torch's thread pools does anyway (the kernels' hot
// loops touch no reference count). Being first in the unit, this declaration wins over the
// default-visibility one in glibc's <sys/single_threaded.h>.
extern "C" {
__attribute__((weak, visibility("hidden"))) char __libc_single_threaded = 0;
}
