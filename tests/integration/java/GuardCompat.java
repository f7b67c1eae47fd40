// pgjdbc through the guard gateway: server-prepared statements (after prepareThreshold),
// binary transfer, a refusal with its SQLSTATE, and the connection still usable after it.
import java.sql.*;

public class GuardCompat {
    public static void main(String[] args) throws Exception {
        String url = args[0];
        try (Connection conn = DriverManager.getConnection(url, args[1], args[2])) {
            try (PreparedStatement ps = conn.prepareStatement("SELECT ssn FROM customers WHERE id = ?")) {
                for (int i = 0; i < 8; i++) {
                    ps.setInt(1, 1);
                    try (ResultSet rs = ps.executeQuery()) {
                        rs.next();
                        if (i == 7) System.out.println("ssn=" + rs.getString(1));
                    }
                }
            }
            try (PreparedStatement ps = conn.prepareStatement("SELECT count(*), sum(rate) FROM products WHERE id <= ?")) {
                for (int i = 0; i < 6; i++) {
                    ps.setInt(1, 5);
                    try (ResultSet rs = ps.executeQuery()) {
                        rs.next();
                        if (i == 5) System.out.println("products=" + rs.getLong(1) + " rate=" + rs.getBigDecimal(2));
                    }
                }
            }
            try (Statement st = conn.createStatement()) {
                st.execute("DROP TABLE products");
                System.out.println("refused=false");
            } catch (SQLException e) {
                System.out.println("refused=" + e.getSQLState());
            }
            try (Statement st = conn.createStatement(); ResultSet rs = st.executeQuery("SELECT 42")) {
                rs.next();
                System.out.println("after=" + rs.getInt(1));
            }
        }
    }
}
