package mailsync.searchnode;

import java.io.FileDescriptor;
import java.io.FileOutputStream;
import java.io.InputStream;
import java.io.PrintStream;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.nio.file.StandardCopyOption;
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
    private static final String NODE_NAME = "embedded";
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
            .put("node.name", NODE_NAME)
            .put("discovery.type", "single-node")
            .put("network.host", host)
            .put("http.port", port)
            .put("transport.port", "0")
            .put("cluster.routing.allocation.disk.threshold_enabled", false)
            .build();
        // The log goes to <home>/logs/<cluster>.log, configured by our own file (never the console: stdout is
        // how the starter learns the URL, and an unread pipe would block the node).
        try (InputStream config = SearchNode.class.getResourceAsStream("log4j2.properties")) {
            Files.copy(config, home.resolve("config").resolve("log4j2.properties"), StandardCopyOption.REPLACE_EXISTING);
        }
        // LogConfigurator.configure points System.out at a logger, so keep the real stdout for the announcement.
        PrintStream announce = new PrintStream(new FileOutputStream(FileDescriptor.out), true, StandardCharsets.UTF_8);
        Environment environment = new Environment(settings, home.resolve("config"));
        LogConfigurator.setNodeName(NODE_NAME);
        LogConfigurator.registerErrorListener();
        LogConfigurator.configure(environment);
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
        announce.println("{\"url\": \"http://" + address.getAddress() + ":" + address.getPort() + "\"}");
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
