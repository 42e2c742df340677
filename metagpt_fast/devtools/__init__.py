"""Development tooling: ahead-of-time compile statistics of the Triton kernels (``aot``) and one reader of compiled
GPU code (``sass``: resource usage and SASS opcodes from ``cuobjdump``). Nothing in the runtime imports this package;
it imports the kernel modules, never the other way round."""
