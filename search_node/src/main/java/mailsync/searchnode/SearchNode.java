package mailsync.searchnode;

import java.nio.file.Files;
import java.nio.file.Path;
import java.util.List;
import java.util.concurrent.CountDownLatch;

import org.opensearch.common.logging.LogConfigurator;
import org.opensearch.common.settings.Settings;
import org.opensearch.env.Environment;
import org.opensearch.http.HttpServerTransport;
import org.opensearch.node.Node;
import org.opensearch.plugins.Plugin;

/** An embedded single-node OpenSearch: the jars come from Maven Central, the plugins from the classpath. */
public final class SearchNode extends Node {
    private static final List<Class<? extends Plugin>> PLUGINS = List.of(
        org.opensearch.transport.Netty4Plugin.class,
        org.opensearch.analysis.common.CommonAnalysisPlugin.class,
        org.opensearch.painless.PainlessPlugin.class,
        org.opensearch.index.reindex.ReindexPlugin.class);

    private SearchNode(Environment environment) {
        super(environment, PLUGINS, true);
    }

    public static void main(String[] args) throws Exception {
        Path home = Path.of(arg(args, "--home", ".local/search-node")).toAbsolutePath();
        Path data = Path.of(arg(args, "--data", home.resolve("data").toString())).toAbsolutePath();
        String host = arg(args, "--host", "127.0.0.1");
        String port = arg(args, "--port", "9200");
        String parentPid = arg(args, "--parent-pid", "");
        for (String dir : List.of("modules", "plugins", "config", "logs")) {
            Files.createDirectories(home.resolve(dir));
        }
        Files.createDirectories(data);
        Settings settings = Settings.builder()
            .put("path.home", home.toString())
            .put("path.data", data.toString())
            .put("path.logs", home.resolve("logs").toString())
            .put("cluster.name", "mailsync-embedded")
            .put("node.name", "embedded")
            .put("discovery.type", "single-node")
            .put("network.host", host)
            .put("http.port", port)
            .put("transport.port", "0")
            .put("cluster.routing.allocation.disk.threshold_enabled", false)
            .build();
        LogConfigurator.registerErrorListener();
        LogConfigurator.configureWithoutConfig(settings);
        Environment environment = new Environment(settings, home.resolve("config"));
        SearchNode node = new SearchNode(environment);
        CountDownLatch stopped = new CountDownLatch(1);
        Runtime.getRuntime().addShutdownHook(new Thread(() -> {
            // close() flushes every shard and releases the data-path lock, so a restart reads the same data.
            try {
                node.close();
            } catch (Exception e) {
                e.printStackTrace();
            }
            stopped.countDown();
        }, "search-node-stop"));
        node.start();
        var address = node.injector().getInstance(HttpServerTransport.class).boundAddress().publishAddress();
        System.out.println("{\"url\": \"http://" + address.getAddress() + ":" + address.getPort() + "\"}");
        System.out.flush();
        if (!parentPid.isEmpty()) {
            ProcessHandle.of(Long.parseLong(parentPid)).ifPresentOrElse(
                parent -> parent.onExit().thenRun(() -> System.exit(0)),
                () -> System.exit(0));
        }
        stopped.await();
    }

    private static String arg(String[] args, String name, String fallback) {
        for (int i = 0; i + 1 < args.length; i++) {
            if (args[i].equals(name)) {
                return args[i + 1];
            }
        }
        return fallback;
    }
}
