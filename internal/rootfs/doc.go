// Package rootfs turns an OCI image, named by manifest digest, into a
// bootable VM root filesystem: one read-only erofs (or ext4) image file per
// digest, plus the image's run configuration.
//
// Convert applies the image's layers in order into a private staging
// directory exactly as the OCI image specification describes (whiteouts,
// opaque directories, hard links, device nodes, ownership, modes, xattrs,
// mtimes), resolving every path inside the staging root so no layer can
// write outside it through a symlink, then builds the filesystem image with
// mkfs.erofs (erofs-utils) or mkfs.ext4 (e2fsprogs) and publishes it with a
// single directory rename.
//
// Store keeps those results below <dir>/by-digest/<digest>/ and makes sure
// each digest is converted once, however many callers ask at the same time.
package rootfs
