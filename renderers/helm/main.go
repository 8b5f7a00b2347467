// sluice's Helm renderer: what `helm template --skip-tests` prints (helm.sh/helm/v4's
// install action, client-only), as a WebAssembly command for sluice's sandbox
// (GOOS=wasip1).
//
// It has no filesystem, network or environment: the host writes one JSON request into its
// memory (the chart's files at the commit, values, release name and namespace, the
// cluster's Kubernetes version and API versions) and reads one JSON response, each
// rendered object with the template it came from. Built as a reactor (-buildmode=c-shared):
// sluice starts it once and calls it per render. The chart sees only its own files, so a
// values path, `.Files.Get` or a symlink cannot reach outside it. Chart repositories are
// never contacted: dependencies must be in `charts/` (`helm dependency build`).
package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path"
	"regexp"
	"slices"
	"sort"
	"strings"
	"time"
	"unsafe"

	"helm.sh/helm/v4/pkg/chart/common"
	"helm.sh/helm/v4/pkg/chart/common/util"
	"helm.sh/helm/v4/pkg/chart/loader/archive"
	chart "helm.sh/helm/v4/pkg/chart/v2"
	"helm.sh/helm/v4/pkg/chart/v2/loader"
	chartutil "helm.sh/helm/v4/pkg/chart/v2/util"
	"helm.sh/helm/v4/pkg/engine"
	"helm.sh/helm/v4/pkg/ignore"
	release "helm.sh/helm/v4/pkg/release/v1"
	releaseutil "helm.sh/helm/v4/pkg/release/v1/util"
	"sigs.k8s.io/yaml"
)

type request struct {
	// Chart is the chart's directory relative to the project root (for origins only).
	Chart string `json:"chart"`
	// Files are the chart's files, by path relative to the chart's directory.
	Files       map[string][]byte `json:"files"`
	ReleaseName string            `json:"release_name"`
	Namespace   string            `json:"namespace"`
	// Values are YAML documents merged in order, later ones winning (`-f a -f b`).
	Values      []string `json:"values"`
	IncludeCRDs bool     `json:"include_crds"`
	// KubeVersion and APIVersions are the cluster's (`--kube-version`, `--api-versions`);
	// empty: Helm's defaults.
	KubeVersion string   `json:"kube_version"`
	APIVersions []string `json:"api_versions"`
}

type document struct {
	// Source is the template the object came from, relative to the project root.
	Source string `json:"source"`
	YAML   string `json:"yaml"`
}

type response struct {
	Documents []document `json:"documents,omitempty"`
	Error     string     `json:"error,omitempty"`
}

func main() {
	in, err := io.ReadAll(os.Stdin)
	if err != nil {
		os.Exit(2)
	}
	if _, err := os.Stdout.Write(handle(in)); err != nil {
		os.Exit(2)
	}
}

// handle answers one request with one JSON response.
func handle(in []byte) []byte {
	var out response
	docs, err := run(bytes.NewReader(in))
	if err != nil {
		out.Error = err.Error()
	} else {
		out.Documents = docs
	}
	text, err := json.Marshal(out)
	if err != nil {
		return []byte(`{"error":"the response does not encode"}`)
	}
	return text
}

// The reactor interface (`go build -buildmode=c-shared`): sluice instantiates the module
// once, calls `_initialize` (Go's runtime and every package's init, paid once), then per
// render `sluice_alloc` for the request's bytes, writes them there, and calls
// `sluice_render`, which returns where the response is: address << 32 | length.
var pending, reply []byte

//go:wasmexport sluice_alloc
func sluiceAlloc(size int32) unsafe.Pointer {
	pending = make([]byte, size)
	return unsafe.Pointer(unsafe.SliceData(pending))
}

//go:wasmexport sluice_render
func sluiceRender() int64 {
	reply = handle(pending)
	pending = nil
	if len(reply) == 0 {
		return 0
	}
	return int64(uintptr(unsafe.Pointer(unsafe.SliceData(reply))))<<32 | int64(len(reply))
}

func run(in io.Reader) ([]document, error) {
	var req request
	if err := json.NewDecoder(in).Decode(&req); err != nil {
		return nil, fmt.Errorf("reading the request: %w", err)
	}
	ch, err := load(req.Files)
	if err != nil {
		return nil, err
	}
	if t := ch.Metadata.Type; t != "" && t != "application" {
		return nil, fmt.Errorf("%s charts are not installable", t)
	}
	if deps := ch.Metadata.Dependencies; len(deps) > 0 {
		if missing := missingDependencies(ch, deps); len(missing) > 0 {
			return nil, fmt.Errorf("found in Chart.yaml, but missing in charts/ directory: %s: sluice never fetches charts; run 'helm dependency build' and commit charts/", strings.Join(missing, ", "))
		}
	}
	if err := chartutil.ValidateReleaseName(req.ReleaseName); err != nil {
		return nil, fmt.Errorf("release name %q: %w", req.ReleaseName, err)
	}
	vals := map[string]any{}
	for i, text := range req.Values {
		current := map[string]any{}
		if err := yaml.Unmarshal([]byte(text), &current); err != nil {
			return nil, fmt.Errorf("values #%d: %w", i+1, err)
		}
		vals = loader.MergeMaps(vals, current)
	}
	caps := common.DefaultCapabilities.Copy()
	if req.KubeVersion != "" {
		v, err := common.ParseKubeVersion(req.KubeVersion)
		if err != nil {
			return nil, fmt.Errorf("kube version %q: %w", req.KubeVersion, err)
		}
		caps.KubeVersion = *v
	}
	caps.APIVersions = append(caps.APIVersions, req.APIVersions...)

	// What `helm install --dry-run=client` (hence `helm template`) does, in its order.
	if err := chartutil.ProcessDependencies(ch, vals); err != nil {
		return nil, fmt.Errorf("chart dependencies processing failed: %w", err)
	}
	options := common.ReleaseOptions{Name: req.ReleaseName, Namespace: req.Namespace, Revision: 1, IsInstall: true}
	values, err := util.ToRenderValuesWithSchemaValidation(ch, vals, options, caps, false)
	if err != nil {
		return nil, err
	}
	if ch.Metadata.KubeVersion != "" && !chartutil.IsCompatibleRange(ch.Metadata.KubeVersion, caps.KubeVersion.String()) {
		return nil, fmt.Errorf("chart requires kubeVersion: %s which is incompatible with Kubernetes %s", ch.Metadata.KubeVersion, caps.KubeVersion.Version)
	}
	files, err := engine.Engine{}.Render(ch, values)
	if err != nil {
		return nil, err
	}
	for name := range files {
		if strings.HasSuffix(name, "NOTES.txt") {
			delete(files, name)
		}
	}
	hooks, manifests, err := releaseutil.SortManifests(files, nil, releaseutil.InstallOrder)
	if err != nil {
		return nil, err
	}
	var docs []document
	if req.IncludeCRDs {
		for _, crd := range ch.CRDObjects() {
			docs = append(docs, splitStream(req.Chart, crd.Filename, string(crd.File.Data))...)
		}
	}
	for _, m := range manifests {
		docs = append(docs, document{Source: source(req.Chart, m.Name), YAML: m.Content})
	}
	for _, h := range hooks {
		if slices.Contains(h.Events, release.HookTest) {
			continue
		}
		docs = append(docs, document{Source: source(req.Chart, h.Path), YAML: h.Manifest})
	}
	return docs, nil
}

// missingDependencies is what `helm template` checks before rendering: every dependency
// Chart.yaml names must be in charts/.
func missingDependencies(ch *chart.Chart, reqs []*chart.Dependency) []string {
	var missing []string
	for _, r := range reqs {
		found := false
		for _, d := range ch.Dependencies() {
			if d.Name() == r.Name {
				found = true
				break
			}
		}
		if !found {
			missing = append(missing, r.Name)
		}
	}
	return missing
}

var separator = regexp.MustCompile(`(?m)^---\s*$`)

// splitStream cuts a file of several documents (a CRD file in crds/) into objects.
func splitStream(chartDir, name, text string) []document {
	var docs []document
	for _, part := range separator.Split(text, -1) {
		if strings.TrimSpace(part) != "" {
			docs = append(docs, document{Source: source(chartDir, name), YAML: part})
		}
	}
	return docs
}

// source turns Helm's template name (`<chart name>/templates/x.yaml`) into a path in the
// project (`<chart dir>/templates/x.yaml`).
func source(chartDir, name string) string {
	if i := strings.IndexByte(name, '/'); i >= 0 {
		name = name[i+1:]
	}
	return path.Join(chartDir, name)
}

// load builds the chart from its files as `helm template` loads a directory: .helmignore
// applied, a UTF-8 byte order mark dropped, subcharts (directories and .tgz) from charts/,
// and Helm's size budget.
func load(files map[string][]byte) (*chart.Chart, error) {
	rules := ignore.Empty()
	if data, ok := files[ignore.HelmIgnore]; ok {
		r, err := ignore.Parse(bytes.NewReader(data))
		if err != nil {
			return nil, fmt.Errorf("%s: %w", ignore.HelmIgnore, err)
		}
		rules = r
	}
	rules.AddDefaults()
	names := make([]string, 0, len(files))
	for name := range files {
		names = append(names, name)
	}
	// The order a directory walk visits them in.
	sort.Slice(names, func(i, j int) bool {
		return slices.Compare(strings.Split(names[i], "/"), strings.Split(names[j], "/")) < 0
	})
	var budget int64
	var out []*archive.BufferedFile
	for _, name := range names {
		if ignored(rules, name) {
			continue
		}
		data := bytes.TrimPrefix(files[name], []byte("\xEF\xBB\xBF"))
		budget += int64(len(data))
		if budget > archive.MaxDecompressedChartSize {
			return nil, fmt.Errorf("chart exceeds the maximum size of %d bytes at %s", archive.MaxDecompressedChartSize, name)
		}
		out = append(out, &archive.BufferedFile{Name: name, Data: data})
	}
	return loader.LoadFiles(out)
}

func ignored(rules *ignore.Rules, name string) bool {
	parts := strings.Split(name, "/")
	for i := 1; i < len(parts); i++ {
		if rules.Ignore(strings.Join(parts[:i], "/"), info{name: parts[i-1], dir: true}) {
			return true
		}
	}
	return rules.Ignore(name, info{name: parts[len(parts)-1]})
}

// info is what .helmignore rules look at: a name and whether it is a directory.
type info struct {
	name string
	dir  bool
}

func (i info) Name() string       { return i.name }
func (i info) Size() int64        { return 0 }
func (i info) ModTime() time.Time { return time.Time{} }
func (i info) IsDir() bool        { return i.dir }
func (i info) Sys() any           { return nil }
func (i info) Mode() fs.FileMode {
	if i.dir {
		return fs.ModeDir | 0o755
	}
	return 0o644
}
