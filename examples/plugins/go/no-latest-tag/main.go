// no-latest-tag as a KRM function, in Go: images must name a tag other than `latest`, or a
// digest. The same rule as the Rust plugin `plugins/no-latest-tag`.
//
// A KRM function reads a ResourceList on stdin and writes one on stdout; sluice runs it as
// a WASI preview 1 command. Built with the standard Go toolchain:
//
//	GOOS=wasip1 GOARCH=wasm go build -o no_latest_tag.wasm .
package main

import (
	"fmt"
	"os"
	"strings"

	"sigs.k8s.io/kustomize/kyaml/fn/framework"
	"sigs.k8s.io/kustomize/kyaml/fn/framework/command"
	"sigs.k8s.io/kustomize/kyaml/yaml"
)

// Where each workload kind keeps its pod spec.
var podSpec = map[string][]string{
	"Pod":                   {"spec"},
	"Deployment":            {"spec", "template", "spec"},
	"ReplicaSet":            {"spec", "template", "spec"},
	"StatefulSet":           {"spec", "template", "spec"},
	"DaemonSet":             {"spec", "template", "spec"},
	"Job":                   {"spec", "template", "spec"},
	"ReplicationController": {"spec", "template", "spec"},
	"CronJob":               {"spec", "jobTemplate", "spec", "template", "spec"},
	"PodTemplate":           {"template", "spec"},
}

var containerLists = []string{"initContainers", "containers", "ephemeralContainers"}

// parseImage splits an image reference into name, tag and digest; a ':' before the last
// '/' belongs to a registry port.
func parseImage(image string) (name, tag, digest string) {
	rest := image
	if at := strings.Index(image, "@"); at >= 0 {
		rest, digest = image[:at], image[at+1:]
	}
	slash := strings.LastIndex(rest, "/") + 1
	if colon := strings.LastIndex(rest[slash:], ":"); colon >= 0 {
		return rest[:slash+colon], rest[slash+colon+1:], digest
	}
	return rest, "", digest
}

func validate(rl *framework.ResourceList) error {
	for _, item := range rl.Items {
		path, ok := podSpec[item.GetKind()]
		if !ok {
			continue
		}
		meta, err := item.GetMeta()
		if err != nil {
			return err
		}
		id := meta.GetIdentifier()
		for _, list := range containerLists {
			field := append(append([]string{}, path...), list)
			containers, err := item.Pipe(yaml.Lookup(field...))
			if err != nil || containers == nil {
				continue
			}
			elements, err := containers.Elements()
			if err != nil {
				return err
			}
			for i, c := range elements {
				image := c.Field("image")
				if image == nil {
					continue
				}
				ref := yaml.GetValue(image.Value)
				_, tag, digest := parseImage(ref)
				if digest == "" && (tag == "" || tag == "latest") {
					rl.Results = append(rl.Results, &framework.Result{
						Message:     fmt.Sprintf("image %s uses the latest tag; pin a version or a digest", ref),
						Severity:    framework.Error,
						ResourceRef: &id,
						Field:       &framework.Field{Path: fmt.Sprintf("%s[%d].image", strings.Join(field, "."), i)},
					})
				}
			}
		}
	}
	return nil
}

func main() {
	cmd := command.Build(framework.ResourceListProcessorFunc(validate), command.StandaloneDisabled, false)
	if err := cmd.Execute(); err != nil {
		os.Exit(1)
	}
}
