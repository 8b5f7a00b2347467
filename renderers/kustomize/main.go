// sluice's Kustomize renderer: `kustomize build` (sigs.k8s.io/kustomize/api krusty) as a
// WebAssembly command for sluice's sandbox (GOOS=wasip1).
//
// It has no filesystem, network or environment: the host writes one JSON request into its
// memory (the files of the project at the commit and the directory to build) and reads one
// JSON response, the rendered objects each with the file it came from. Built as a reactor
// (-buildmode=c-shared): sluice starts it once and calls it per render; as a command it
// reads the request on stdin, for trying it by hand. Kustomize
// runs on an in-memory filesystem holding only those files, so `../` cannot leave the
// project and a symlink cannot point anywhere. Remote bases and exec or container plugins
// are refused with an error that says what to commit instead.
package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"path"
	"strings"
	"unsafe"

	"sigs.k8s.io/kustomize/api/konfig"
	"sigs.k8s.io/kustomize/api/krusty"
	"sigs.k8s.io/kustomize/api/types"
	"sigs.k8s.io/kustomize/kyaml/filesys"
	"sigs.k8s.io/kustomize/kyaml/openapi"
	"sigs.k8s.io/kustomize/kyaml/yaml"
)

type request struct {
	// Root is the directory holding the kustomization, relative to the project root.
	Root string `json:"root"`
	// Files are the project's files at the commit, by path relative to its root.
	Files map[string][]byte `json:"files"`
}

type document struct {
	// Source is the file the object came from, relative to the project root: a resource
	// file, or the kustomization that generated it.
	Source string `json:"source"`
	YAML   string `json:"yaml"`
}

type response struct {
	Documents []document `json:"documents,omitempty"`
	Error     string     `json:"error,omitempty"`
}

const base = "/project"

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

// The schema kyaml uses when a kustomization names none, as it is before any render.
var defaultSchema = openapi.GetSchemaVersion()

func run(in io.Reader) ([]document, error) {
	// One instance serves many projects: a schema a kustomization chose (`openapi:`) is
	// global in kyaml and must not carry over to the next render. kustomize resets it only
	// when the next kustomization names one too.
	if openapi.GetSchemaVersion() != defaultSchema {
		openapi.ResetOpenAPI()
	}
	var req request
	if err := json.NewDecoder(in).Decode(&req); err != nil {
		return nil, fmt.Errorf("reading the request: %w", err)
	}
	fs := filesys.MakeFsInMemory()
	for name, data := range req.Files {
		if err := fs.WriteFile(path.Join(base, name), data); err != nil {
			return nil, err
		}
	}
	root := path.Join(base, req.Root)
	userAsked, err := trackOrigins(fs, root)
	if err != nil {
		return nil, err
	}
	opts := krusty.MakeDefaultOptions()
	// `kustomize build` orders by kind (legacy) unless told otherwise.
	opts.Reorder = krusty.ReorderOptionUnspecified
	opts.PluginConfig = types.DisabledPluginConfig()
	opts.LoadRestrictions = types.LoadRestrictionsRootOnly
	m, err := krusty.MakeKustomizer(opts).Run(fs, root)
	if err != nil {
		return nil, explain(err)
	}
	sources := make([]string, 0, m.Size())
	for _, r := range m.Resources() {
		origin, _ := r.GetOrigin()
		source := path.Join(req.Root, konfig.DefaultKustomizationFileName())
		if origin != nil && origin.Repo == "" {
			if origin.Path != "" {
				source = path.Join(req.Root, origin.Path)
			} else if origin.ConfiguredIn != "" {
				source = path.Join(req.Root, origin.ConfiguredIn)
			}
		}
		sources = append(sources, strings.TrimPrefix(source, "/"))
	}
	if !userAsked {
		if err := m.RemoveOriginAnnotations(); err != nil {
			return nil, err
		}
	}
	docs := make([]document, 0, m.Size())
	for i, r := range m.Resources() {
		y, err := r.AsYAML()
		if err != nil {
			return nil, err
		}
		docs = append(docs, document{Source: sources[i], YAML: string(y)})
	}
	return docs, nil
}

// trackOrigins adds `originAnnotations` to the root kustomization's buildMetadata so that
// every object says which file it came from; it reports whether the kustomization asked
// for them itself (then they stay in the output, as `kustomize build` would print them).
func trackOrigins(fs filesys.FileSystem, root string) (bool, error) {
	for _, name := range konfig.RecognizedKustomizationFileNames() {
		file := path.Join(root, name)
		if !fs.Exists(file) {
			continue
		}
		data, err := fs.ReadFile(file)
		if err != nil {
			return false, err
		}
		node, err := yaml.Parse(string(data))
		if err != nil {
			// Let kustomize report it, with its own words.
			return false, nil
		}
		list, err := node.Pipe(yaml.LookupCreate(yaml.SequenceNode, "buildMetadata"))
		if err != nil || list == nil {
			return false, nil
		}
		for _, item := range list.Content() {
			if item.Value == types.OriginAnnotations {
				return true, nil
			}
		}
		list.YNode().Content = append(list.YNode().Content, yaml.NewScalarRNode(types.OriginAnnotations).YNode())
		text, err := node.String()
		if err != nil {
			return false, err
		}
		return false, fs.WriteFile(file, []byte(text))
	}
	return false, nil
}

// explain turns what kustomize says when it reaches for something the sandbox does not
// have into what to commit instead.
func explain(err error) error {
	text := strings.ReplaceAll(err.Error(), base+"/", "")
	text = strings.ReplaceAll(text, base, ".")
	switch {
	case strings.Contains(text, "no 'git' program") || strings.Contains(text, "dial tcp"):
		// Go's wasip1 network is an in-process stand-in: nothing left the sandbox.
		what := "a remote base"
		if i := strings.Index(text, "accumulating resources from '"); i >= 0 {
			rest := text[i+len("accumulating resources from '"):]
			if j := strings.IndexByte(rest, '\''); j >= 0 {
				what = fmt.Sprintf("remote base '%s'", rest[:j])
			}
		}
		return fmt.Errorf("%s is not fetched (sluice renders only what is in the project): vendor the base into the repository and refer to it by a relative path", what)
	case strings.Contains(text, "plugin") || strings.Contains(text, "function"):
		return fmt.Errorf("%s: exec, container and Go plugins are not run (only kustomize's built-in transformers are): render with a sluice plugin instead, or commit the output", text)
	}
	return fmt.Errorf("%s", text)
}
