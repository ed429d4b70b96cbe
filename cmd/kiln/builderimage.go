package main

import (
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"

	"github.com/kiln-build/kiln/internal/builderimage"
	"github.com/kiln-build/kiln/internal/config"
)

// builderImageCommand manages the builder VM image the vm runtime boots.
// It runs on the server host, not against the API: the image is files in
// the server's data dir.
func builderImageCommand() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "builder-image",
		Short: "Build or inspect the builder VM image the vm runtime boots",
	}
	cmd.AddCommand(builderImageBuildCommand(), builderImageShowCommand())
	return cmd
}

// imageDirFlags registers the settings that locate the image, with the
// same names, environment variables and config keys as `kiln serve`.
func imageDirFlags(fs *pflag.FlagSet, cfg *config.Config) {
	fs.StringVar(&cfg.ConfigFile, "config", os.Getenv("KILN_CONFIG"), "YAML config file (env KILN_CONFIG)")
	fs.String(config.Flag("data"), "", "data directory (env "+config.Env("data")+"); the image goes to <data>/builder")
	fs.String(config.Flag("builder_image"), "", "builder image directory (env "+config.Env("builder_image")+"; default <data>/builder)")
}

// imageDir resolves the image directory like the server does.
func imageDir(fs *pflag.FlagSet, cfg *config.Config) (string, error) {
	if err := cfg.Load(fs); err != nil {
		return "", err
	}
	if cfg.BuilderImage != "" {
		return cfg.BuilderImage, nil
	}
	return filepath.Join(cfg.DataDir, "builder"), nil
}

func builderImageBuildCommand() *cobra.Command {
	var (
		cfg       config.Config
		opts      builderimage.Options
		noInstall bool
		asJSON    bool
	)
	cmd := &cobra.Command{
		Use:   "build",
		Short: "Assemble the builder VM image (kernel, init, kiln-agent, buildkitd, runc) from this machine and kiln's source",
		Long: `Assemble the builder VM image from the kernel, modules and runc installed on
this machine and kiln's own source (kiln-agent, kiln-init and buildkitd are
compiled, so the go command and the kiln source tree are needed; --source
points at it, default: the tree above the working directory or above the
kiln binary). Missing Debian packages (linux-image-amd64, erofs-utils, runc)
are installed with apt-get unless --no-install. The same inputs give the
same image; when the directory already holds it, nothing is rebuilt.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			dir, err := imageDir(cmd.Flags(), &cfg)
			if err != nil {
				return err
			}
			opts.OutputDir = dir
			opts.InstallPackages = !noInstall
			if opts.SourceDir == "" {
				opts.SourceDir = sourceBesideBinary()
			}
			prebuilt := opts.AgentBinary != "" && opts.InitBinary != "" && opts.BuildkitdBinary != ""
			if wd, _ := os.Getwd(); opts.SourceDir == "" && !prebuilt && kilnSourceAbove(wd) == "" {
				return fmt.Errorf("kiln's source tree is needed to compile kiln-agent, kiln-init and buildkitd, and none is above %s or the kiln binary: run this inside it, pass --source DIR, or give prebuilt static binaries with --agent, --init and --buildkitd", wd)
			}
			opts.Logger = slog.New(slog.NewTextHandler(cmd.ErrOrStderr(), nil))
			ctx, stop := signal.NotifyContext(cmd.Context(), os.Interrupt, syscall.SIGTERM)
			defer stop()
			m, err := builderimage.Build(ctx, opts)
			if err != nil {
				return fmt.Errorf("build the builder image in %s: %w", dir, err)
			}
			return printManifest(cmd.OutOrStdout(), m, asJSON)
		},
	}
	fs := cmd.Flags()
	imageDirFlags(fs, &cfg)
	fs.StringVar(&opts.SourceDir, "source", "", "kiln source tree to compile kiln-agent, kiln-init and buildkitd from")
	fs.StringVar(&opts.AgentBinary, "agent", "", "prebuilt static kiln-agent binary to use instead of compiling it")
	fs.StringVar(&opts.InitBinary, "init", "", "prebuilt static kiln-init binary to use instead of compiling it")
	fs.StringVar(&opts.BuildkitdBinary, "buildkitd", "", "prebuilt static buildkitd binary to use instead of compiling it")
	fs.StringVar(&opts.KernelVersion, "kernel-version", "", "kernel to use from /boot (default: the newest one with modules)")
	fs.StringVar(&opts.Runc, "runc", "", "runc binary to copy into the image (default /usr/sbin/runc)")
	fs.BoolVar(&noInstall, "no-install", false, "do not apt-get install missing packages; fail instead")
	fs.BoolVar(&asJSON, "json", false, "print the manifest as JSON")
	return cmd
}

func builderImageShowCommand() *cobra.Command {
	var (
		cfg    config.Config
		verify bool
		asJSON bool
	)
	cmd := &cobra.Command{
		Use:   "show",
		Short: "Print the builder image's digest and manifest",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			dir, err := imageDir(cmd.Flags(), &cfg)
			if err != nil {
				return err
			}
			m, err := builderimage.Load(dir)
			if err != nil {
				return err
			}
			if verify {
				if err := m.Verify(); err != nil {
					return err
				}
			}
			return printManifest(cmd.OutOrStdout(), m, asJSON)
		},
	}
	imageDirFlags(cmd.Flags(), &cfg)
	cmd.Flags().BoolVar(&verify, "verify", false, "re-hash the image files and check them against the manifest")
	cmd.Flags().BoolVar(&asJSON, "json", false, "print the manifest as JSON")
	return cmd
}

func printManifest(w io.Writer, m builderimage.Manifest, asJSON bool) error {
	if asJSON {
		enc := json.NewEncoder(w)
		enc.SetIndent("", "  ")
		return enc.Encode(m)
	}
	fmt.Fprintf(w, "digest     %s\n", m.Digest)
	fmt.Fprintf(w, "directory  %s\n", m.Dir)
	fmt.Fprintf(w, "kernel     %s\n", m.KernelVersion)
	for _, f := range []builderimage.File{m.Kernel, m.Initramfs, m.Rootfs} {
		fmt.Fprintf(w, "  %-15s %7.1f MiB  sha256:%s\n", f.Name, float64(f.Size)/(1<<20), f.SHA256)
	}
	fmt.Fprintf(w, "buildkit   %s\n", m.Components.BuildKit)
	fmt.Fprintf(w, "runc       %s\n", m.Components.Runc)
	fmt.Fprintf(w, "go         %s\n", m.Components.Go)
	fmt.Fprintf(w, "modules    %d (%v)\n", len(m.Modules), m.Modules)
	return nil
}

// sourceBesideBinary finds the kiln source tree above the running binary
// (make build puts it in <source>/bin/kiln), so `kiln builder-image build`
// works from any directory on a machine that built kiln. It is empty when
// the working directory is inside a source tree (Build looks there) or no
// tree is found.
func sourceBesideBinary() string {
	if wd, err := os.Getwd(); err == nil && kilnSourceAbove(wd) != "" {
		return ""
	}
	exe, err := os.Executable()
	if err != nil {
		return ""
	}
	return kilnSourceAbove(filepath.Dir(exe))
}

func kilnSourceAbove(dir string) string {
	for d := dir; ; d = filepath.Dir(d) {
		if b, err := os.ReadFile(filepath.Join(d, "go.mod")); err == nil {
			for _, line := range strings.Split(string(b), "\n") {
				if f := strings.Fields(line); len(f) == 2 && f[0] == "module" && f[1] == "github.com/kiln-build/kiln" {
					return d
				}
			}
		}
		if filepath.Dir(d) == d {
			return ""
		}
	}
}
