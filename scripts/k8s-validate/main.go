// k8s-validate: strict offline schema check of rendered Kubernetes manifests.
//
// Reads a multi-document YAML stream (helm template output) on stdin and decodes every object
// of a built-in kind into its k8s.io/api Go type with unknown fields rejected, so a misspelt or
// misplaced field (readinesProbe, seccompProfile under the wrong parent) fails instead of being
// dropped by the API server. Custom resources (ServiceMonitor, PrometheusRule) are reported as
// skipped. Stands in for kubeconform, whose JSON schemas are downloaded at run time.
package main

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"

	appsv1 "k8s.io/api/apps/v1"
	batchv1 "k8s.io/api/batch/v1"
	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	policyv1 "k8s.io/api/policy/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	"sigs.k8s.io/yaml"
)

func target(apiVersion, kind string) any {
	switch apiVersion + "/" + kind {
	case "v1/ConfigMap":
		return &corev1.ConfigMap{}
	case "v1/Secret":
		return &corev1.Secret{}
	case "v1/Service":
		return &corev1.Service{}
	case "v1/ServiceAccount":
		return &corev1.ServiceAccount{}
	case "v1/Pod":
		return &corev1.Pod{}
	case "apps/v1/Deployment":
		return &appsv1.Deployment{}
	case "apps/v1/StatefulSet":
		return &appsv1.StatefulSet{}
	case "batch/v1/Job":
		return &batchv1.Job{}
	case "policy/v1/PodDisruptionBudget":
		return &policyv1.PodDisruptionBudget{}
	case "networking.k8s.io/v1/NetworkPolicy":
		return &networkingv1.NetworkPolicy{}
	case "rbac.authorization.k8s.io/v1/Role":
		return &rbacv1.Role{}
	case "rbac.authorization.k8s.io/v1/RoleBinding":
		return &rbacv1.RoleBinding{}
	}
	return nil
}

func main() {
	reader := utilyaml.NewYAMLReader(bufio.NewReader(os.Stdin))
	checked, skipped, failed := 0, 0, 0
	for {
		doc, err := reader.Read()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			fmt.Fprintf(os.Stderr, "k8s-validate: reading input: %v\n", err)
			os.Exit(2)
		}
		if len(bytes.TrimSpace(doc)) == 0 {
			continue
		}
		var meta struct {
			APIVersion string `json:"apiVersion"`
			Kind       string `json:"kind"`
			Metadata   struct {
				Name string `json:"name"`
			} `json:"metadata"`
		}
		if err := yaml.Unmarshal(doc, &meta); err != nil {
			fmt.Printf("FAIL not YAML: %v\n", err)
			failed++
			continue
		}
		if meta.Kind == "" {
			continue // a document holding only comments
		}
		id := fmt.Sprintf("%s %s/%s", meta.APIVersion, meta.Kind, meta.Metadata.Name)
		obj := target(meta.APIVersion, meta.Kind)
		if obj == nil {
			fmt.Printf("skip %s (no built-in schema)\n", id)
			skipped++
			continue
		}
		if err := yaml.UnmarshalStrict(doc, obj); err != nil {
			fmt.Printf("FAIL %s: %v\n", id, err)
			failed++
			continue
		}
		fmt.Printf("ok   %s\n", id)
		checked++
	}
	fmt.Printf("k8s-validate: %d checked, %d skipped, %d failed\n", checked, skipped, failed)
	if failed > 0 {
		os.Exit(1)
	}
}
