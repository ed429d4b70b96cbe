package buildcontext

import (
	"io/fs"
	"syscall"
)

func platformStatKey(info fs.FileInfo, k *statKey) {
	st, ok := info.Sys().(*syscall.Stat_t)
	if !ok {
		return
	}
	k.dev, k.ino = uint64(st.Dev), uint64(st.Ino)
	k.ctime = st.Ctim.Nano()
}
