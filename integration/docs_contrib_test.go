//go:build integration

package integration

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"regexp"
	"slices"
	"strings"
	"testing"

	toml "github.com/pelletier/go-toml/v2"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	nodev1 "k8s.io/api/node/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	k8syaml "sigs.k8s.io/yaml"

	"github.com/loopkit/loopkit/internal/testutil"
	"github.com/loopkit/loopkit/pkg/config"
)

// docCopyRootOwned copies a repository file into a fresh root-owned 0700
// directory with mode 0644, as the loaders require of /etc files.
func docCopyRootOwned(t *testing.T, src string) string {
	t.Helper()
	b, err := os.ReadFile(src)
	if err != nil {
		t.Fatal(err)
	}
	dst := filepath.Join(t.TempDir(), filepath.Base(src))
	if err := os.WriteFile(dst, b, 0o644); err != nil {
		t.Fatal(err)
	}
	return dst
}

// docTOMLKeys lists the toml tag names of a struct type, recursing into
// struct and map-of-struct fields.
func docTOMLKeys(typ reflect.Type) []string {
	var keys []string
	for i := 0; i < typ.NumField(); i++ {
		f := typ.Field(i)
		tag := strings.Split(f.Tag.Get("toml"), ",")[0]
		if tag == "" || tag == "-" {
			continue
		}
		keys = append(keys, tag)
		ft := f.Type
		if ft.Kind() == reflect.Map {
			ft = ft.Elem()
		}
		if ft.Kind() == reflect.Struct {
			keys = append(keys, docTOMLKeys(ft)...)
		}
	}
	return keys
}

// docRequireDocumented fails for every key that the sample neither sets nor
// shows in a comment ("key =", "# key =", or a "[key.name]" table).
func docRequireDocumented(t *testing.T, sample string, keys []string) {
	t.Helper()
	b, err := os.ReadFile(sample)
	if err != nil {
		t.Fatal(err)
	}
	for _, k := range keys {
		re := regexp.MustCompile(`(?m)^(#\s*)?(` + regexp.QuoteMeta(k) + `\s*=|\[` + regexp.QuoteMeta(k) + `[.\]])`)
		if !re.Match(b) {
			t.Errorf("%s does not document key %q", filepath.Base(sample), k)
		}
	}
}

// TestContribConfigSamples checks that the sample configuration files load
// with the binaries' strict loaders, state exactly the built-in defaults,
// and mention every key the loaders accept.
func TestContribConfigSamples(t *testing.T) {
	testutil.RequireRoot(t) // the loaders require root-owned files
	repo := criRepoRoot(t)

	t.Run("loop-snapshotter", func(t *testing.T) {
		src := filepath.Join(repo, "contrib", "config", "loop-snapshotter.toml")
		cfg, loaded, err := config.LoadSnapshotter(docCopyRootOwned(t, src), true)
		if err != nil || !loaded {
			t.Fatalf("load %s: loaded=%v err=%v", src, loaded, err)
		}
		if def := config.DefaultSnapshotter(); !reflect.DeepEqual(cfg, def) {
			t.Errorf("sample differs from the built-in defaults:\nsample   %+v\ndefaults %+v", cfg, def)
		}
		docRequireDocumented(t, src, docTOMLKeys(reflect.TypeOf(config.Snapshotter{})))
	})
	t.Run("oci-loop-hook", func(t *testing.T) {
		src := filepath.Join(repo, "contrib", "config", "oci-loop-hook.toml")
		cfg, loaded, err := config.LoadHook(docCopyRootOwned(t, src), true)
		if err != nil || !loaded {
			t.Fatalf("load %s: loaded=%v err=%v", src, loaded, err)
		}
		if def := config.DefaultHook(); !reflect.DeepEqual(cfg, def) {
			t.Errorf("sample differs from the built-in defaults:\nsample   %+v\ndefaults %+v", cfg, def)
		}
		docRequireDocumented(t, src, docTOMLKeys(reflect.TypeOf(config.Hook{})))
		// The commented catalog example must itself be valid.
		b, err := os.ReadFile(src)
		if err != nil {
			t.Fatal(err)
		}
		var example []string
		for _, line := range strings.Split(string(b), "\n") {
			if strings.HasPrefix(line, "# [images.") || (len(example) > 0 && strings.HasPrefix(line, "# ") && strings.Contains(line, " = ")) {
				example = append(example, strings.TrimPrefix(line, "# "))
			}
		}
		if len(example) == 0 {
			t.Fatal("no commented [images.*] example in the sample")
		}
		withCatalog := filepath.Join(t.TempDir(), "with-catalog.toml")
		if err := os.WriteFile(withCatalog, []byte(string(b)+"\n"+strings.Join(example, "\n")+"\n"), 0o644); err != nil {
			t.Fatal(err)
		}
		cat, _, err := config.LoadHook(withCatalog, true)
		if err != nil {
			t.Fatalf("sample with its catalog example uncommented: %v", err)
		}
		if len(cat.Images) == 0 {
			t.Errorf("catalog example produced no images")
		}
	})
}

// TestContribContainerdSnippets checks the containerd snippets against the
// snapshotter's defaults (the 1.6 snippet is also run for real by
// TestCRIPodOnLoopRootfs).
func TestContribContainerdSnippets(t *testing.T) {
	repo := criRepoRoot(t)
	load := func(name string) map[string]any {
		b, err := os.ReadFile(filepath.Join(repo, "contrib", "containerd", name))
		if err != nil {
			t.Fatal(err)
		}
		var m map[string]any
		if err := toml.Unmarshal(b, &m); err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		return m
	}
	get := func(m map[string]any, keys ...string) any {
		var v any = m
		for _, k := range keys {
			mm, ok := v.(map[string]any)
			if !ok {
				return nil
			}
			v = mm[k]
		}
		return v
	}
	v2 := load("config-v2-containerd-1.6.toml")
	v4 := load("config-v4-containerd-2.x.toml")
	for name, m := range map[string]map[string]any{"v2": v2, "v4": v4} {
		if get(m, "proxy_plugins", "loop", "type") != "snapshot" || get(m, "proxy_plugins", "loop", "address") != config.DefaultSnapshotterAddress {
			t.Errorf("%s: proxy_plugins.loop = %v", name, get(m, "proxy_plugins", "loop"))
		}
	}
	if get(v2, "version") != int64(2) || get(v4, "version") != int64(4) {
		t.Errorf("versions: %v, %v", get(v2, "version"), get(v4, "version"))
	}
	if get(v2, "plugins", "io.containerd.grpc.v1.cri", "containerd", "snapshotter") != "loop" {
		t.Errorf("v2: CRI snapshotter is not loop")
	}
	if get(v4, "plugins", "io.containerd.cri.v1.images", "snapshotter") != "loop" {
		t.Errorf("v4: CRI images snapshotter is not loop")
	}
	if get(v4, "plugins", "io.containerd.cri.v1.images", "pinned_images", "sandbox") == nil {
		t.Errorf("v4: no pinned sandbox image")
	}
	if get(v4, "proxy_plugins", "loop", "exports", "root") != config.DefaultSnapshotterRoot {
		t.Errorf("v4: exports.root is not the snapshotter's default root")
	}
	t.Run("migrate", func(t *testing.T) { docMigrateUnchanged(t, repo, "config-v4-containerd-2.x.toml") })
}

// docMigrateUnchanged checks that containerd 2.x reads the snippet as its
// current format: `containerd config migrate` prints no migration warning,
// and every setting of the snippet (its commented examples uncommented
// too) comes out with the same value, so no key is misspelt, misplaced or
// silently dropped.
func docMigrateUnchanged(t *testing.T, repo, name string) {
	var d2 ctdDaemon
	for _, d := range ctdDaemons(t) {
		if d.major == 2 {
			d2 = d
		}
	}
	d2.require(t)
	raw, err := os.ReadFile(filepath.Join(repo, "contrib", "containerd", name))
	if err != nil {
		t.Fatal(err)
	}
	// "#   key = v" and "# [table]" lines are examples: uncomment them.
	uncommented := regexp.MustCompile(`(?m)^(\s*)# ?(\s*(\[|[a-z_]+ = ))`).ReplaceAllString(string(raw), "$1$2")
	for variant, body := range map[string]string{"as shipped": string(raw), "examples uncommented": uncommented} {
		t.Run(strings.ReplaceAll(variant, " ", "_"), func(t *testing.T) {
			var in map[string]any
			if err := toml.Unmarshal([]byte(body), &in); err != nil {
				t.Fatalf("%s (%s): %v\n%s", name, variant, err, body)
			}
			path := filepath.Join(t.TempDir(), "config.toml")
			if err := os.WriteFile(path, []byte(body), 0o600); err != nil {
				t.Fatal(err)
			}
			var stdout, stderr strings.Builder
			cmd := exec.Command(d2.containerd, "--config", path, "config", "migrate")
			cmd.Stdout, cmd.Stderr = &stdout, &stderr
			if err := cmd.Run(); err != nil {
				t.Fatalf("containerd config migrate: %v\n%s", err, stderr.String())
			}
			if strings.Contains(stderr.String(), "migrated") {
				t.Errorf("containerd %s migrates %s: not in its current form:\n%s", containerd2Version, name, stderr.String())
			}
			var out map[string]any
			if err := toml.Unmarshal([]byte(stdout.String()), &out); err != nil {
				t.Fatal(err)
			}
			docSubset(t, "", in, out)
		})
	}
}

// docSubset reports every leaf of want that got is missing or changed.
func docSubset(t *testing.T, at string, want, got any) {
	t.Helper()
	switch w := want.(type) {
	case map[string]any:
		g, ok := got.(map[string]any)
		if !ok {
			t.Errorf("%s: containerd has %T, the snippet a table", at, got)
			return
		}
		for k, v := range w {
			docSubset(t, at+"."+k, v, g[k])
		}
	case []any:
		g, ok := got.([]any)
		if !ok || len(g) != len(w) {
			t.Errorf("%s: containerd has %v, the snippet %v", at, got, want)
			return
		}
		for i := range w {
			docSubset(t, fmt.Sprintf("%s[%d]", at, i), w[i], g[i])
		}
	default:
		if fmt.Sprint(want) != fmt.Sprint(got) {
			t.Errorf("%s: the snippet sets %v, containerd read %v (unknown or misplaced key?)", at, want, got)
		}
	}
}

// TestContribSystemdUnit checks the unit with systemd-analyze and for the
// settings operations rely on.
func TestContribSystemdUnit(t *testing.T) {
	repo := criRepoRoot(t)
	src := filepath.Join(repo, "contrib", "systemd", "loop-snapshotter.service")
	b, err := os.ReadFile(src)
	if err != nil {
		t.Fatal(err)
	}
	unit := string(b)
	for _, want := range []string{"Type=notify", "Before=containerd.service", "Restart=always", "ExecStart=/usr/local/bin/loop-snapshotter"} {
		if !regexp.MustCompile(`(?m)^` + regexp.QuoteMeta(want) + `(\s|$)`).MatchString(unit) {
			t.Errorf("unit lacks %q", want)
		}
	}
	// Sandboxing that would hide /dev/loop* or give the daemon a private
	// mount namespace breaks it.
	for _, bad := range []string{"PrivateDevices", "PrivateMounts", "ProtectSystem", "DevicePolicy", "DeviceAllow", "ReadOnlyPaths", "InaccessiblePaths", "ProtectKernelModules", "MountFlags"} {
		if regexp.MustCompile(`(?m)^` + bad + `=`).MatchString(unit) {
			t.Errorf("unit sets %s", bad)
		}
	}
	sock, err := os.ReadFile(filepath.Join(repo, "contrib", "systemd", "loop-snapshotter.socket"))
	if err != nil {
		t.Fatal(err)
	}
	// The socket unit must create the daemon's default socket, before
	// containerd; the service must pull it in.
	for _, want := range []string{"ListenStream=" + config.DefaultSnapshotterAddress, "Before=containerd.service", "WantedBy=sockets.target"} {
		if !regexp.MustCompile(`(?m)^` + regexp.QuoteMeta(want) + `(\s|$)`).MatchString(string(sock)) {
			t.Errorf("socket unit lacks %q", want)
		}
	}
	for _, want := range []string{"Wants=loop-snapshotter.socket", "After=loop-snapshotter.socket"} {
		if !regexp.MustCompile(`(?m)^` + regexp.QuoteMeta(want) + `(\s|$)`).MatchString(unit) {
			t.Errorf("unit lacks %q", want)
		}
	}
	if _, err := exec.LookPath("systemd-analyze"); err != nil {
		testutil.Missing(t, "systemd-analyze", "apt-get install systemd")
	}
	// Verify copies whose ExecStart names an existing executable.
	dir := t.TempDir()
	fake := filepath.Join(dir, "loop-snapshotter")
	if err := os.Symlink("/bin/true", fake); err != nil {
		t.Fatal(err)
	}
	cp := filepath.Join(dir, "loop-snapshotter.service")
	if err := os.WriteFile(cp, []byte(strings.ReplaceAll(unit, "/usr/local/bin/loop-snapshotter", fake)), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "loop-snapshotter.socket"), sock, 0o644); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command("systemd-analyze", "verify", cp, filepath.Join(dir, "loop-snapshotter.socket"))
	cmd.Dir = dir
	out, err := cmd.CombinedOutput()
	if err != nil || len(strings.TrimSpace(string(out))) > 0 {
		t.Errorf("systemd-analyze verify: %v\n%s", err, out)
	}
}

// TestContribKubernetesManifests decodes contrib/kubernetes/*.yaml strictly
// into the Kubernetes API types (an unknown or misspelt field is an error),
// checks that the objects fit together (selectors, volumes, the install
// script, the RuntimeClass handler the guide configures), and runs the
// DaemonSet's install script against a scratch host tree, twice: the second
// run must change nothing and not restart the service.
func TestContribKubernetesManifests(t *testing.T) {
	repo := criRepoRoot(t)
	dir := filepath.Join(repo, "contrib", "kubernetes")
	files, err := filepath.Glob(filepath.Join(dir, "*.yaml"))
	if err != nil || len(files) == 0 {
		t.Fatalf("no manifests in %s: %v", dir, err)
	}
	var (
		ds      *appsv1.DaemonSet
		cms     = map[string]*corev1.ConfigMap{}
		rcs     = map[string]*nodev1.RuntimeClass{}
		pods    []*corev1.Pod
		decoded int
	)
	for _, f := range files {
		raw, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		for i, doc := range regexp.MustCompile(`(?m)^---\s*$`).Split(string(raw), -1) {
			if strings.TrimSpace(regexp.MustCompile(`(?m)^#.*$`).ReplaceAllString(doc, "")) == "" {
				continue
			}
			where := fmt.Sprintf("%s document %d", filepath.Base(f), i+1)
			var tm metav1.TypeMeta
			if err := k8syaml.Unmarshal([]byte(doc), &tm); err != nil {
				t.Fatalf("%s: %v", where, err)
			}
			strict := func(obj any) {
				t.Helper()
				if err := k8syaml.UnmarshalStrict([]byte(doc), obj); err != nil {
					t.Fatalf("%s: %v", where, err)
				}
				decoded++
			}
			switch tm.APIVersion + " " + tm.Kind {
			case "apps/v1 DaemonSet":
				ds = &appsv1.DaemonSet{}
				strict(ds)
			case "v1 ConfigMap":
				cm := &corev1.ConfigMap{}
				strict(cm)
				cms[cm.Name] = cm
			case "node.k8s.io/v1 RuntimeClass":
				rc := &nodev1.RuntimeClass{}
				strict(rc)
				rcs[rc.Name] = rc
			case "v1 Pod":
				p := &corev1.Pod{}
				strict(p)
				pods = append(pods, p)
			default:
				t.Fatalf("%s: unexpected %s %s", where, tm.APIVersion, tm.Kind)
			}
		}
	}
	t.Logf("%d objects decoded strictly", decoded)
	t.Run("consistent", func(t *testing.T) {
		k8sCheckDaemonSet(t, ds, cms)
		rc := rcs["runc-loop"]
		if rc == nil || rc.Handler != "runc-loop" {
			t.Fatalf("RuntimeClass runc-loop with handler runc-loop: %+v", rc)
		}
		guide, err := os.ReadFile(filepath.Join(repo, "docs", "kubernetes.md"))
		if err != nil {
			t.Fatal(err)
		}
		if !strings.Contains(string(guide), "containerd.runtimes."+rc.Handler+"]") {
			t.Errorf("docs/kubernetes.md does not configure the CRI runtime %q the RuntimeClass names", rc.Handler)
		}
		if rc.Scheduling == nil || rc.Scheduling.NodeSelector["loopkit.io/loop-snapshotter"] != ds.Spec.Template.Spec.NodeSelector["loopkit.io/loop-snapshotter"] {
			t.Errorf("RuntimeClass and DaemonSet select different nodes")
		}
		for _, p := range pods {
			if p.Spec.RuntimeClassName == nil || rcs[*p.Spec.RuntimeClassName] == nil {
				t.Errorf("pod %s names RuntimeClass %v, not one shipped", p.Name, p.Spec.RuntimeClassName)
			}
		}
	})
	t.Run("install-script", func(t *testing.T) {
		k8sRunInstallScript(t, cms["loop-snapshotter-install"].Data["install.sh"], repo)
	})
}

// k8sCheckDaemonSet checks what the API server would reject or what would
// make the DaemonSet useless: a selector that does not match its pods,
// mounts of undeclared volumes, a missing script, no way to reach the
// host's systemd.
func k8sCheckDaemonSet(t *testing.T, ds *appsv1.DaemonSet, cms map[string]*corev1.ConfigMap) {
	t.Helper()
	if ds == nil {
		t.Fatal("no DaemonSet")
	}
	for k, v := range ds.Spec.Selector.MatchLabels {
		if ds.Spec.Template.Labels[k] != v {
			t.Errorf("selector %s=%s does not match the pod template's labels", k, v)
		}
	}
	spec := ds.Spec.Template.Spec
	if !spec.HostPID {
		t.Errorf("hostPID is needed to nsenter into the host's systemd")
	}
	vols := map[string]corev1.Volume{}
	for _, v := range spec.Volumes {
		vols[v.Name] = v
	}
	for _, c := range append(append([]corev1.Container{}, spec.InitContainers...), spec.Containers...) {
		if c.SecurityContext == nil || c.SecurityContext.Privileged == nil || !*c.SecurityContext.Privileged {
			t.Errorf("container %s is not privileged (nsenter into PID 1 needs it)", c.Name)
		}
		for _, m := range c.VolumeMounts {
			if _, ok := vols[m.Name]; !ok {
				t.Errorf("container %s mounts undeclared volume %s", c.Name, m.Name)
			}
		}
	}
	for _, v := range spec.Volumes {
		if v.ConfigMap != nil {
			cm := cms[v.ConfigMap.Name]
			if cm == nil || cm.Namespace != ds.Namespace || cm.Data["install.sh"] == "" {
				t.Errorf("volume %s: ConfigMap %s with install.sh in namespace %s not shipped", v.Name, v.ConfigMap.Name, ds.Namespace)
			}
		}
		if v.HostPath != nil && !filepath.IsAbs(v.HostPath.Path) {
			t.Errorf("volume %s: host path %q is not absolute", v.Name, v.HostPath.Path)
		}
	}
	if len(spec.InitContainers) != 1 || !slices.Contains(spec.InitContainers[0].Command, "/scripts/install.sh") {
		t.Errorf("the init container does not run /scripts/install.sh: %+v", spec.InitContainers)
	}
}

// k8sRunInstallScript runs the DaemonSet's install script with a release
// tree made by install-contrib (what `make install DESTDIR=` writes) and a
// scratch host, systemctl replaced by a recorder.
func k8sRunInstallScript(t *testing.T, script, repo string) {
	t.Helper()
	testutil.RequireBinaries(t, "sh", "cmp", "install")
	tmp := t.TempDir()
	src := filepath.Join(tmp, "release")
	host := filepath.Join(tmp, "host")
	for _, f := range []struct{ path, body string }{
		{"usr/local/bin/loop-snapshotter", "#!/bin/sh\n"},
	} {
		p := filepath.Join(src, f.path)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte(f.body), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	for _, u := range []string{"loop-snapshotter.service", "loop-snapshotter.socket"} {
		b, err := os.ReadFile(filepath.Join(repo, "contrib", "systemd", u))
		if err != nil {
			t.Fatal(err)
		}
		p := filepath.Join(src, "etc", "systemd", "system", u)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, b, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	scriptPath := filepath.Join(tmp, "install.sh")
	if err := os.WriteFile(scriptPath, []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	calls := filepath.Join(tmp, "systemctl.calls")
	recorder := filepath.Join(tmp, "systemctl")
	if err := os.WriteFile(recorder, []byte("#!/bin/sh\necho \"$*\" >> "+calls+"\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	run := func() string {
		t.Helper()
		os.Remove(calls)
		cmd := exec.Command("sh", scriptPath)
		cmd.Env = append(os.Environ(), "SRC="+src, "HOST="+host, "SYSTEMCTL="+recorder)
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("install.sh: %v\n%s", err, out)
		}
		b, _ := os.ReadFile(calls)
		return string(b)
	}
	first := run()
	for _, p := range []string{"usr/local/bin/loop-snapshotter", "etc/systemd/system/loop-snapshotter.service", "etc/systemd/system/loop-snapshotter.socket"} {
		if _, err := os.Stat(filepath.Join(host, p)); err != nil {
			t.Errorf("install.sh did not install %s: %v", p, err)
		}
	}
	for _, want := range []string{"daemon-reload", "enable loop-snapshotter.socket loop-snapshotter.service", "restart loop-snapshotter.service", "start loop-snapshotter.socket loop-snapshotter.service"} {
		if !strings.Contains(first, want+"\n") {
			t.Errorf("first install: systemctl %q not called; calls:\n%s", want, first)
		}
	}
	if second := run(); strings.Contains(second, "restart") {
		t.Errorf("an unchanged install restarted the service; calls:\n%s", second)
	}
}
