package microvm

func rdtsc() uint64

const haveTSC = true
