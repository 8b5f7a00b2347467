// fluxpush pushes a directory as a Flux OCI artifact exactly as `flux push artifact` does
// (flux2 v2.9.5's cmd/flux/push_artifact.go, generic provider): the same library
// (github.com/fluxcd/pkg/oci, at the version flux v2.9.5 pins), the same calls, the same
// manifest, config, layer and annotations. The flux CLI itself cannot be built from the Go
// module proxy (it embeds manifests its Makefile generates), so the tests use its push path.
//
// Usage: fluxpush oci://host/repo:tag --path=DIR --source=URL --revision=REV [--creds=USER:PASSWORD]
// [--annotations=key=value]... Prints the pushed digest (sha256:…) on stdout.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"strings"
	"time"

	"github.com/fluxcd/pkg/oci"
	"github.com/google/go-containerregistry/pkg/crane"
	"github.com/google/go-containerregistry/pkg/name"
)

type list []string

func (l *list) String() string     { return strings.Join(*l, ",") }
func (l *list) Set(v string) error { *l = append(*l, v); return nil }

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "✗", err)
		os.Exit(1)
	}
}

func run() error {
	if len(os.Args) < 2 {
		return fmt.Errorf("usage: fluxpush oci://host/repo:tag --path=DIR --source=URL --revision=REV")
	}
	ociURL := os.Args[1]
	fs := flag.NewFlagSet("fluxpush", flag.ContinueOnError)
	path := fs.String("path", "", "directory or file to push")
	source := fs.String("source", "", "the source address, e.g. the Git URL")
	revision := fs.String("revision", "", "the source revision in the format '<branch|tag>@sha1:<commit-sha>'")
	creds := fs.String("creds", "", "credentials for OCI registry in the format <username>[:<password>]")
	var annotations list
	fs.Var(&annotations, "annotations", "custom OCI annotations in the format '<key>=<value>'")
	if err := fs.Parse(os.Args[2:]); err != nil {
		return err
	}

	url, err := oci.ParseArtifactURL(ociURL)
	if err != nil {
		return err
	}
	if _, err := name.ParseReference(url); err != nil {
		return err
	}
	if _, err := os.Stat(*path); err != nil {
		return fmt.Errorf("invalid path '%s', must point to an existing directory or file: %w", *path, err)
	}
	extra := map[string]string{}
	for _, a := range annotations {
		kv := strings.Split(a, "=")
		if len(kv) != 2 {
			return fmt.Errorf("invalid annotation %s, must be in the format key=value", a)
		}
		extra[kv[0]] = kv[1]
	}
	meta := oci.Metadata{Source: *source, Revision: *revision, Annotations: extra}

	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	opts := oci.DefaultOptions()
	if *creds != "" {
		authenticator, err := oci.GetAuthFromCredentials(*creds)
		if err != nil {
			return fmt.Errorf("could not login with credentials: %w", err)
		}
		opts = append(opts, crane.WithAuth(authenticator))
	}
	digestURL, err := oci.NewClient(opts).Push(ctx, url, *path, oci.WithPushMetadata(meta))
	if err != nil {
		return fmt.Errorf("pushing artifact failed: %w", err)
	}
	digest, err := name.NewDigest(digestURL)
	if err != nil {
		return fmt.Errorf("artifact digest parsing failed: %w", err)
	}
	fmt.Println(digest.DigestStr())
	return nil
}
