// LD_PRELOAD library: every program of a process tree sees this x86 CPU without its AVX-512
// (an AVX2/FMA CPU such as AMD Zen 2/3), at native speed, by answering cpuid itself.
//
// Why: each library picks its kernels from cpuid (ours, torch's cpuinfo, MKL, oneDNN,
// OpenBLAS, bitsandbytes, ONNX Runtime's MLAS), and only some have a switch to be held to
// AVX2; MLAS has none, so its AVX2 code could not be timed on an AVX-512 host (issue 15).
// How: Linux's cpuid faulting (arch_prctl(ARCH_SET_CPUID, 0); /proc/cpuinfo flag
// cpuid_fault) turns cpuid into a SIGSEGV in this thread and every thread and child forked
// from it (execve resets it, and LD_PRELOAD sets it again). The handler runs the real cpuid
// with faulting briefly off, clears the AVX-512 family's bits, and steps over the
// instruction. Instructions are not emulated: code that executes AVX-512 without asking
// cpuid still runs (scripts/emulated_cpu.sh, under QEMU, is the check for that).
//
// The program's own SIGSEGV handlers (Python's faulthandler, pytest's) are kept: sigaction()
// and signal() for SIGSEGV record them without replacing ours, and ours passes every fault
// that is not a cpuid on to them.
// Limits: a thread that blocks SIGSEGV, or a program that installs its SIGSEGV handler by
// other calls (sigset, sysv_signal, a raw rt_sigaction), dies at its next cpuid; libraries
// linked into an executable (not dlopen()ed, as Python's extensions are) run their
// constructors before this library's, unmasked; static binaries are not masked at all.
// Set QK_CPUID_MASK_REPORT=1 for a count of the answered cpuid instructions at exit;
// qk_cpuid_mask_count() returns it (for ctypes).
#define _GNU_SOURCE
#include <asm/prctl.h>
#include <cpuid.h>
#include <dlfcn.h>
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <ucontext.h>
#include <unistd.h>

typedef int (*sigaction_fn)(int, const struct sigaction*, struct sigaction*);
static sigaction_fn real_sigaction;
static struct sigaction program_segv;  // what the program asked for SIGSEGV to do
static volatile int active;
static volatile long answered;
static volatile pid_t owner;  // the process whose handler table program_segv describes

long qk_cpuid_mask_count(void) { return answered; }
// This copy's own address of it: a reference by name would be interposed by a first copy.
static long own_count(void) __attribute__((alias("qk_cpuid_mask_count")));

static int set_cpuid(int enabled) { return (int)syscall(SYS_arch_prctl, ARCH_SET_CPUID, enabled); }

#define BIT(n) (1u << (n))

// The features an AVX2-only CPU lacks, by (leaf, subleaf, register); Intel SDM vol. 2,
// CPUID, and AMD APM vol. 3, appendix E. AMX too: ONNX Runtime's MLAS enables its AMX GEMM
// outside its AVX-512 check. Leaf 0xD (XSAVE state sizes) is left alone: XCR0 cannot be
// masked, and sizes that disagree with it could undersize an XSAVE buffer; dispatchers
// require the feature bits below as well as XCR0.
static void mask_avx512(uint32_t leaf, uint32_t sub, uint32_t r[4]) {
  enum { A, B, C, D };
  if (leaf == 7 && sub == 0) {
    // F, DQ, IFMA, PF, ER, CD, BW, VL
    r[B] &= ~(BIT(16) | BIT(17) | BIT(21) | BIT(26) | BIT(27) | BIT(28) | BIT(30) | BIT(31));
    // VBMI, VBMI2, GFNI (Zen 2/3 have none), VNNI, BITALG, VPOPCNTDQ
    r[C] &= ~(BIT(1) | BIT(6) | BIT(8) | BIT(11) | BIT(12) | BIT(14));
    // 4VNNIW, 4FMAPS, VP2INTERSECT, AMX-BF16, FP16, AMX-TILE, AMX-INT8
    r[D] &= ~(BIT(2) | BIT(3) | BIT(8) | BIT(22) | BIT(23) | BIT(24) | BIT(25));
  } else if (leaf == 7 && sub == 1) {
    r[A] &= ~(BIT(4) | BIT(5) | BIT(21) | BIT(23));  // AVX-VNNI, AVX512_BF16, AMX-FP16, AVX-IFMA
    // AVX-VNNI-INT8, AVX-NE-CONVERT, AMX-COMPLEX, AVX-VNNI-INT16, AVX10
    r[D] &= ~(BIT(4) | BIT(5) | BIT(8) | BIT(10) | BIT(19));
  } else if (leaf == 0x1D || leaf == 0x1E || leaf == 0x24) {
    r[A] = r[B] = r[C] = r[D] = 0;  // AMX tile and TMUL information; AVX10
  }
}

static void to_default(void) {
  struct sigaction d;
  memset(&d, 0, sizeof d);
  d.sa_handler = SIG_DFL;
  real_sigaction(SIGSEGV, &d, NULL);
}

// What the kernel would have done with this SIGSEGV under the program's own disposition.
static void pass_on(int sig, siginfo_t* si, void* ctx) {
  const struct sigaction p = program_segv;
  const int sent = si->si_code <= 0;  // kill(), raise(), tgkill(): nothing re-executes
  if (p.sa_flags & SA_RESETHAND) {
    program_segv.sa_handler = SIG_DFL;
    program_segv.sa_flags = 0;
  }
  if (p.sa_handler == SIG_IGN) {
    if (!sent) to_default();  // the kernel does not let a fault be ignored: the re-fault kills
  } else if (p.sa_handler == SIG_DFL) {
    to_default();  // a fault re-executes and kills; a sent signal is sent again
    if (sent) raise(SIGSEGV);
  } else if (p.sa_flags & SA_SIGINFO) {
    p.sa_sigaction(sig, si, ctx);
  } else {
    p.sa_handler(sig);
  }
}

static void on_segv(int sig, siginfo_t* si, void* ctx) {
  greg_t* g = ((ucontext_t*)ctx)->uc_mcontext.gregs;
  // A cpuid fault is a general-protection fault (SI_KERNEL) at a mapped instruction, so
  // reading the instruction bytes cannot fault; page faults carry SEGV_MAPERR/ACCERR.
  const uint8_t* ip = (const uint8_t*)g[REG_RIP];
  if (!(si->si_code == SI_KERNEL && ip[0] == 0x0F && ip[1] == 0xA2)) return pass_on(sig, si, ctx);
  const int saved = errno;
  const uint32_t leaf = (uint32_t)g[REG_RAX], sub = (uint32_t)g[REG_RCX];
  uint32_t r[4];
  set_cpuid(1);
  __cpuid_count(leaf, sub, r[0], r[1], r[2], r[3]);
  set_cpuid(0);
  mask_avx512(leaf, sub, r);
  g[REG_RAX] = r[0];  // cpuid zero-extends into the 64-bit registers
  g[REG_RBX] = r[1];
  g[REG_RCX] = r[2];
  g[REG_RDX] = r[3];
  g[REG_RIP] += 2;
  __atomic_add_fetch(&answered, 1, __ATOMIC_RELAXED);
  errno = saved;
}

// A vfork()ed child (Python's subprocess) shares this memory but not the handler table, and
// resets its handlers before exec: those calls must not rewrite the parent's record.
static void after_fork(void) { owner = getpid(); }

int sigaction(int sig, const struct sigaction* act, struct sigaction* old) {
  if (!real_sigaction) real_sigaction = (sigaction_fn)dlsym(RTLD_NEXT, "sigaction");
  if (sig != SIGSEGV || !active || getpid() != owner) return real_sigaction(sig, act, old);
  if (old) *old = program_segv;
  if (act) program_segv = *act;
  return 0;
}

sighandler_t signal(int sig, sighandler_t handler) {
  if (sig != SIGSEGV || !active) {
    static sighandler_t (*real_signal)(int, sighandler_t);
    if (!real_signal) real_signal = (sighandler_t(*)(int, sighandler_t))dlsym(RTLD_NEXT, "signal");
    return real_signal(sig, handler);
  }
  struct sigaction act, old;
  memset(&act, 0, sizeof act);
  act.sa_handler = handler;
  act.sa_flags = SA_RESTART;
  sigemptyset(&act.sa_mask);
  return sigaction(sig, &act, &old) == 0 ? old.sa_handler : SIG_ERR;
}

__attribute__((constructor)) static void install(void) {
  // A second copy of this library in one process leaves it to the first (whose symbols
  // interpose on the second's): one handler, one count.
  if (dlsym(RTLD_DEFAULT, "qk_cpuid_mask_count") != (void*)own_count) return;
  real_sigaction = (sigaction_fn)dlsym(RTLD_NEXT, "sigaction");
  struct sigaction sa;
  memset(&sa, 0, sizeof sa);
  sa.sa_sigaction = on_segv;
  sa.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_NODEFER;  // ONSTACK: a stack overflow still reaches faulthandler
  // Other signals wait while cpuid faulting is briefly off inside the handler.
  sigfillset(&sa.sa_mask);
  sigdelset(&sa.sa_mask, SIGSEGV);
  sigdelset(&sa.sa_mask, SIGBUS);
  sigdelset(&sa.sa_mask, SIGILL);
  sigdelset(&sa.sa_mask, SIGFPE);
  real_sigaction(SIGSEGV, &sa, &program_segv);
  if (set_cpuid(0) != 0) {
    fprintf(stderr, "cpuid_mask: this kernel or CPU has no cpuid faulting (arch_prctl ARCH_SET_CPUID: %s)\n",
            strerror(errno));
    _exit(97);
  }
  owner = getpid();
  pthread_atfork(NULL, NULL, after_fork);
  active = 1;
}

__attribute__((destructor)) static void report(void) {
  const char* r = getenv("QK_CPUID_MASK_REPORT");
  if (active && r && r[0] == '1')
    fprintf(stderr, "cpuid_mask: %ld cpuid answered without AVX-512 (pid %d)\n", answered, getpid());
}
