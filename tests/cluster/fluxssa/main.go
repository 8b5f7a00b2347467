// flux-ssa runs one reconcile of Flux's kustomize-controller over a directory of plain
// manifests, with Flux's own apply engine (github.com/fluxcd/pkg/ssa) driven the way
// kustomize-controller v1.9.0 drives it (internal/controller/kustomization_controller.go):
//
//   - objects read with ssa's ReadObjects and normalized, owner labels set
//     (kustomize.toolkit.fluxcd.io/name and /namespace), 4 concurrent SSA workers
//     (--concurrent-ssa's default), the client's 50 QPS and burst of 300 (Flux's defaults);
//   - ApplyAllStaged with the controller's apply options (field manager
//     kustomize-controller, exclusion and force selectors, metadata cleanup);
//   - the inventory made of the change set, the stale objects (old inventory minus new)
//     deleted with DeleteAll and the controller's inclusion/exclusion labels (no wait for
//     the deletions, as the controller);
//   - the health check of spec.wait: true, WaitForSetWithContext every 5 s with the
//     direct cluster reader (DisableStatusPollerCache is on by default in v1.9.0).
//
// What the controller does besides, and this does not: fetch the source artifact from
// source-controller, run `kustomize build` (here the manifests are read as they are, as
// kustomize-controller's generated kustomization would include them), keep the inventory
// in the Kustomization's status (here a file), patch status and emit events.
//
// Usage: flux-ssa -kubeconfig K -dir D -name N -namespace NS -inventory FILE -timeout 30m
package main

import (
	"bufio"
	"bytes"
	"context"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"time"

	"github.com/fluxcd/cli-utils/pkg/kstatus/polling"
	"github.com/fluxcd/cli-utils/pkg/kstatus/polling/clusterreader"
	"github.com/fluxcd/cli-utils/pkg/kstatus/polling/engine"
	"github.com/fluxcd/cli-utils/pkg/object"
	"github.com/fluxcd/pkg/ssa"
	"github.com/fluxcd/pkg/ssa/normalize"
	ssautil "github.com/fluxcd/pkg/ssa/utils"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/tools/clientcmd"
	"sigs.k8s.io/controller-runtime/pkg/client"
)

const group = "kustomize.toolkit.fluxcd.io"

func main() {
	kubeconfig := flag.String("kubeconfig", "", "kubeconfig file")
	dir := flag.String("dir", "", "directory of manifests (*.yaml, *.yml, *.json)")
	name := flag.String("name", "bench", "the Kustomization's name")
	namespace := flag.String("namespace", "", "the Kustomization's namespace and targetNamespace")
	inventoryFile := flag.String("inventory", "", "file that keeps the inventory between runs")
	timeout := flag.Duration("timeout", 30*time.Minute, "the Kustomization's spec.timeout")
	flag.Parse()
	if err := run(*kubeconfig, *dir, *name, *namespace, *inventoryFile, *timeout); err != nil {
		fmt.Fprintln(os.Stderr, "flux-ssa:", err)
		os.Exit(1)
	}
}

func run(kubeconfig, dir, name, namespace, inventoryFile string, timeout time.Duration) error {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()

	cfg, err := clientcmd.BuildConfigFromFlags("", kubeconfig)
	if err != nil {
		return err
	}
	cfg.QPS, cfg.Burst = 50, 300
	cfg.UserAgent = "flux-ssa/kustomize-controller"
	kube, err := client.New(cfg, client.Options{})
	if err != nil {
		return err
	}
	poller := polling.NewStatusPoller(kube, kube.RESTMapper(), polling.Options{
		ClusterReaderFactory: engine.ClusterReaderFactoryFunc(clusterreader.NewDirectClusterReader),
	})

	objects, err := read(dir, namespace)
	if err != nil {
		return err
	}
	if err := normalize.UnstructuredList(objects); err != nil {
		return err
	}
	manager := ssa.NewResourceManager(kube, poller, ssa.Owner{Field: "kustomize-controller", Group: group})
	manager.SetOwnerLabels(objects, name, namespace)
	manager.SetConcurrency(4)

	changeSet, err := manager.ApplyAllStaged(ctx, objects, applyOptions())
	if err != nil {
		return fmt.Errorf("apply: %w", err)
	}

	old, err := readInventory(inventoryFile)
	if err != nil {
		return err
	}
	current := map[string]string{}
	for _, e := range changeSet.Entries {
		current[e.ObjMetadata.String()] = e.GroupVersion
	}
	var stale []*unstructured.Unstructured
	for id, version := range old {
		if _, ok := current[id]; ok {
			continue
		}
		m, err := object.ParseObjMetadata(id)
		if err != nil {
			return err
		}
		// The change set's GroupVersion is the version alone, as in the controller's
		// inventory (inventory.Diff).
		u := &unstructured.Unstructured{}
		u.SetGroupVersionKind(schema.GroupVersionKind{
			Group:   m.GroupKind.Group,
			Version: version,
			Kind:    m.GroupKind.Kind,
		})
		u.SetName(m.Name)
		u.SetNamespace(m.Namespace)
		stale = append(stale, u)
	}
	if len(stale) > 0 {
		_, err := manager.DeleteAll(ctx, stale, ssa.DeleteOptions{
			PropagationPolicy: metav1.DeletePropagationBackground,
			Inclusions:        manager.GetOwnerLabels(name, namespace),
			Exclusions: map[string]string{
				group + "/prune":     "disabled",
				group + "/reconcile": "disabled",
				group + "/ssa":       "ignore",
			},
		})
		if err != nil {
			return fmt.Errorf("prune: %w", err)
		}
	}
	if err := writeInventory(inventoryFile, current); err != nil {
		return err
	}

	var toCheck []object.ObjMetadata
	for _, e := range changeSet.Entries {
		if e.Action != ssa.SkippedAction {
			toCheck = append(toCheck, e.ObjMetadata)
		}
	}
	if err := manager.WaitForSetWithContext(ctx, toCheck, ssa.WaitOptions{
		Interval: 5 * time.Second,
		Timeout:  timeout,
	}); err != nil {
		return fmt.Errorf("health check: %w", err)
	}
	applied := 0
	for _, e := range changeSet.Entries {
		if e.Action == ssa.CreatedAction || e.Action == ssa.ConfiguredAction {
			applied++
		}
	}
	fmt.Printf("applied %d of %d objects, pruned %d, healthy\n", applied, len(changeSet.Entries), len(stale))
	return nil
}

// applyOptions are kustomize-controller's for a Kustomization without force or ignore rules.
func applyOptions() ssa.ApplyOptions {
	opts := ssa.DefaultApplyOptions()
	opts.ExclusionSelector = map[string]string{
		group + "/reconcile": "disabled",
		group + "/ssa":       "ignore",
	}
	opts.IfNotPresentSelector = map[string]string{group + "/ssa": "IfNotPresent"}
	opts.ForceSelector = map[string]string{group + "/force": "enabled"}
	managers := []ssa.FieldManager{
		{Name: "kubectl", OperationType: metav1.ManagedFieldsOperationApply},
		{Name: "kubectl", OperationType: metav1.ManagedFieldsOperationUpdate},
		{Name: "before-first-apply", OperationType: metav1.ManagedFieldsOperationUpdate},
		{Name: "kustomize-controller", OperationType: metav1.ManagedFieldsOperationUpdate},
	}
	opts.Cleanup = ssa.ApplyCleanupOptions{
		Annotations: []string{
			corev1.LastAppliedConfigAnnotation,
			"kustomize.toolkit.fluxcd.io/checksum",
			"fluxcd.io/sync-checksum",
		},
		Labels:        []string{"fluxcd.io/sync-gc-mark"},
		FieldManagers: managers,
		Exclusions:    map[string]string{group + "/ssa": "merge"},
	}
	return opts
}

// read returns the objects of every manifest file under dir, in path order, namespaced
// objects without a namespace put in namespace (the Kustomization's targetNamespace;
// unlike kustomize, it does not tell cluster-scoped kinds apart: the bench has none).
func read(dir, namespace string) ([]*unstructured.Unstructured, error) {
	var paths []string
	err := filepath.WalkDir(dir, func(p string, d os.DirEntry, err error) error {
		if err != nil {
			return err
		}
		ext := filepath.Ext(p)
		if !d.IsDir() && (ext == ".yaml" || ext == ".yml" || ext == ".json") {
			paths = append(paths, p)
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	sort.Strings(paths)
	var all bytes.Buffer
	for _, p := range paths {
		b, err := os.ReadFile(p)
		if err != nil {
			return nil, err
		}
		all.WriteString("\n---\n")
		all.Write(b)
	}
	objects, err := ssautil.ReadObjects(&all)
	if err != nil {
		return nil, err
	}
	for _, o := range objects {
		if o.GetNamespace() == "" && o.GetKind() != "Namespace" {
			o.SetNamespace(namespace)
		}
	}
	return objects, nil
}

// The inventory file: one "id version" line per object (the Kustomization's
// status.inventory entries).
func readInventory(path string) (map[string]string, error) {
	out := map[string]string{}
	f, err := os.Open(path)
	if os.IsNotExist(err) {
		return out, nil
	} else if err != nil {
		return nil, err
	}
	defer f.Close()
	s := bufio.NewScanner(f)
	for s.Scan() {
		id, version, ok := strings.Cut(s.Text(), " ")
		if ok {
			out[id] = version
		}
	}
	return out, s.Err()
}

func writeInventory(path string, inv map[string]string) error {
	var b strings.Builder
	for id, version := range inv {
		fmt.Fprintf(&b, "%s %s\n", id, version)
	}
	return os.WriteFile(path, []byte(b.String()), 0o644)
}
