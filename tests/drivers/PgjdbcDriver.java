// pgjdbc through iampool: default prepareThreshold (5), so each PreparedStatement switches to a
// named server-side statement after five executions; 32 threads (see workload.md).
import java.sql.Connection;
import java.sql.DriverManager;
import java.sql.PreparedStatement;
import java.sql.ResultSet;
import java.sql.SQLException;
import java.util.ArrayList;
import java.util.Collections;
import java.util.List;
import java.util.Properties;

public class PgjdbcDriver {
    static final int CLIENTS = 32;
    static final int ROUNDS = 40;

    static long one(PreparedStatement ps) throws SQLException {
        try (ResultSet rs = ps.executeQuery()) {
            if (!rs.next()) {
                throw new SQLException("no row");
            }
            return rs.getLong(1);
        }
    }

    static long[] client(int c, String url, Properties props, String tag, List<String> errors)
            throws SQLException {
        long total = 0;
        long statements = 0;
        try (Connection db = DriverManager.getConnection(url, props);
             PreparedStatement q1 = db.prepareStatement("select ?::int + v from items where id = ?");
             PreparedStatement q2 = db.prepareStatement("select length(name) from items where id = ?");
             PreparedStatement q3 = db.prepareStatement("select count(*) from items where v < ?")) {
            for (int i = 0; i < ROUNDS; i++) {
                int k = (c * 31 + i) % 100 + 1;
                try {
                    q1.setInt(1, i);
                    q1.setInt(2, k);
                    total += one(q1);
                    q2.setInt(1, k);
                    total += one(q2);
                    q3.setInt(1, 3 * k);
                    total += one(q3);
                    db.setAutoCommit(false);
                    total += one(q1);
                    db.commit();
                    db.setAutoCommit(true);
                    statements += 4;
                } catch (SQLException e) {
                    errors.add("client " + c + " round " + i + ": " + e.getMessage());
                    try {
                        db.rollback();
                    } catch (SQLException ignored) {
                        // the error above is the one reported
                    }
                    db.setAutoCommit(true);
                }
            }
            try (PreparedStatement ins = db.prepareStatement(
                    "insert into log (tag, client, i, x) values (?, ?, ?, ?)")) {
                for (int i = 0; i < ROUNDS; i++) {
                    ins.setString(1, tag);
                    ins.setInt(2, c);
                    ins.setInt(3, i);
                    ins.setInt(4, c * 1000 + i);
                    ins.addBatch();
                }
                ins.executeBatch();
            }
            try (PreparedStatement sum = db.prepareStatement(
                    "select sum(x) from log where tag = ? and client = ?")) {
                sum.setString(1, tag);
                sum.setInt(2, c);
                total += one(sum);
            }
            statements += 2;
        }
        return new long[] {total, statements};
    }

    public static void main(String[] args) throws Exception {
        String url = "jdbc:postgresql://" + args[0] + ":" + args[1] + "/" + args[4];
        Properties props = new Properties();
        props.setProperty("user", args[2]);
        props.setProperty("password", args[3]);
        props.setProperty("sslmode", "disable");
        props.setProperty("connectTimeout", "20");
        String tag = args[5];
        List<String> errors = Collections.synchronizedList(new ArrayList<>());
        long[][] results = new long[CLIENTS][];
        List<Thread> threads = new ArrayList<>();
        for (int c = 0; c < CLIENTS; c++) {
            final int id = c;
            Thread t = new Thread(() -> {
                try {
                    results[id] = client(id, url, props, tag, errors);
                } catch (Exception e) {
                    errors.add("client " + id + ": " + e);
                }
            });
            threads.add(t);
            t.start();
        }
        for (Thread t : threads) {
            t.join();
        }
        if (!errors.isEmpty()) {
            for (String e : errors.subList(0, Math.min(10, errors.size()))) {
                System.err.println(e);
            }
            System.out.println("RESULT failed " + errors.size());
            System.exit(1);
        }
        long total = 0;
        long statements = 0;
        for (long[] r : results) {
            total += r[0];
            statements += r[1];
        }
        System.out.println("RESULT ok " + total + " " + statements);
    }
}
