package loader

//go:generate go tool bpf2go -cc $BPF_CLANG -cflags $BPF_CFLAGS -target bpfel -type pairing -type flow -type verdict_reason -type backend_info -type client_key -type binding proxy ../bpf/proxy.bpf.c -- -I../bpf -I..
